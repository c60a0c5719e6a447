"""Dataset-level calibration: a constant-memory accumulator of per-image and pooled statistics.

:class:`DatasetCalibration` consumes batches of predictions and labels, runs the fused statistics kernel
(``calibops.functional.binned_stats``, hard bins, no gradient) and keeps only sums:

- pooled (micro) statistics ``count, sum_p, sum_y`` per (class, bin), float64: (C', M) each;
- sums of the per-image ECE/ACE/MCE and the number of images where each is defined (macro): (C',) each;
- the dataset reliability histogram ``H[c, a, j]`` (SPEC §1), int64: (C', M, M);
- the number of images.

That is O(C'·M²) memory whatever the number of images or voxels. Under ``torch.distributed`` the sums are
all-reduced (two collectives) in :meth:`~DatasetCalibration.compute` / :meth:`~DatasetCalibration.histogram`,
so every rank gets the result of one process seeing all the data (gloo and nccl).

Optionally (``keep_records=True``) one record per (image, class) with ECE/ACE/MCE (and Dice with
``dice=True``) is kept for a per-image CSV; that list grows with the data set and is the one exception.
The metric formulas are not repeated here: per-image and pooled errors both come from
:func:`calibops.reference.calibration_errors_from_stats`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import functional as F
from .reference import BinnedStats, CalibrationErrors, bin_edges, calibration_errors_from_stats

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["DatasetCalibration", "DatasetCalibrationResult", "reliability_histogram_counts"]

_FLOAT_STATE = ("count", "sum_p", "sum_y", "macro_sum")
_INT_STATE = ("macro_n", "hist", "num_images")
_METRICS = ("ece", "ace", "mce")


class DatasetCalibrationResult(NamedTuple):
    """Dataset calibration errors, each field a ``CalibrationErrors(ece, ace, mce)`` of (C',) float32.

    ``macro``: mean over images of the per-image values (images where a value is NaN are skipped; NaN if no
    image has it). ``micro``: the same formulas on the statistics summed over all images.
    ``num_images``: images seen (over all ranks when distributed). ``classes``: the class index of each of
    the C' entries. ``images_per_class``: (C',) int64, images in which the class has at least one voxel
    (the number of images its macro ECE/ACE/MCE average over).
    """

    macro: CalibrationErrors
    micro: CalibrationErrors
    num_images: int
    classes: tuple[int, ...]
    images_per_class: torch.Tensor


def reliability_histogram_counts(stats: BinnedStats, right: bool = False) -> torch.Tensor:
    """The dataset reliability histogram contribution of per-image hard statistics (B, C, M).

    For every image b, class c and non-empty confidence bin j, the bin accuracy ``S_y/n`` (float32, as the
    statistics) is binned with the same edges and ``right`` rule as the confidences; returns int64
    ``H[c, a, j]`` (C, M, M) counting those (image, bin) pairs, accuracy bin 0 = lowest accuracy.
    """
    count, sum_y = stats.count, stats.sum_y
    if count.dim() != 3 or count.shape != sum_y.shape:
        raise ValueError(
            f"stats must be (B, C, M) tensors, got count {tuple(count.shape)}, sum_y {tuple(sum_y.shape)}"
        )
    B, C, M = count.shape
    edges = bin_edges(M, count.device)
    valid = count > 0
    den = torch.where(valid, count, torch.ones_like(count))
    acc = torch.where(valid, sum_y / den, torch.zeros_like(count))
    a = torch.bucketize(acc.float().contiguous(), edges[1:], right=right).clamp_(max=M - 1)  # [B, C, M]
    c = torch.arange(C, device=count.device).view(1, C, 1)
    j = torch.arange(M, device=count.device).view(1, 1, M)
    flat = (c * M + a) * M + j  # [B, C, M] index into (C, M, M)
    return torch.bincount(flat[valid], minlength=C * M * M).view(C, M, M).to(torch.int64)


def _dist_ready(process_group: Any) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


class DatasetCalibration:
    """Calibration of a segmentation model over a whole data set, in O(C'·M²) memory.

    Args:
        num_classes: C, the number of channels of the predictions.
        num_bins: M, hard confidence bins (SPEC §1 edges), also used for the accuracy axis of the histogram.
        include_background: keep class 0 (default False, like the papers' evaluation). C' = C - 1 without it
            (C' = C = 1 for a single-channel prediction).
        to_onehot_y: targets are integer label maps (B, 1, *spatial) or (B, *spatial).
        softmax / sigmoid: the predictions are logits; apply this activation first.
        ignore_index: label value left out of every statistic (needs ``to_onehot_y``).
        right: bin edge rule (SPEC §1).
        backend: statistics backend (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``).
        validate: value checks of :func:`calibops.functional.binned_stats` (probabilities in [0, 1], labels in
            range); keep them on for evaluation.
        keep_records: keep one record per (image, class) with ECE/ACE/MCE (O(images·C') memory).
        dice: add the Dice score of the hard prediction (argmax, or ``p > 0.5`` for sigmoid / one channel)
            to the records (needs ``keep_records``).
        process_group: the ``torch.distributed`` group to reduce over (default: the world).

    Example::

        metric = DatasetCalibration(num_classes=4, to_onehot_y=True, softmax=True)
        for logits, labels in loader:
            metric.update(model(images), labels)
        res = metric.compute()          # res.macro.ece, res.micro.ace, ... each (C',)
        H = metric.histogram()          # (C', M, M) int64
        metric.plot(class_names=["liver", "kidney", "spleen"]).savefig("hist.pdf")
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 20,
        include_background: bool = False,
        to_onehot_y: bool = False,
        softmax: bool = False,
        sigmoid: bool = False,
        ignore_index: int | None = None,
        right: bool = False,
        backend: str = "auto",
        validate: bool = True,
        keep_records: bool = False,
        dice: bool = False,
        process_group: Any = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int >= 1, got {type(num_classes).__name__}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        F._check_options(num_bins, "hard", softmax, sigmoid, ignore_index, right, to_onehot_y)
        for name, v in (
            ("include_background", include_background), ("to_onehot_y", to_onehot_y), ("softmax", softmax),
            ("sigmoid", sigmoid), ("validate", validate), ("keep_records", keep_records), ("dice", dice),
        ):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if dice and not keep_records:
            raise ValueError("dice=True adds Dice to the per-image records: pass keep_records=True as well")
        self.num_classes = num_classes
        self.num_bins = num_bins
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.softmax = softmax
        self.sigmoid = sigmoid
        self.ignore_index = ignore_index
        self.right = right
        self.backend = backend
        self.validate = validate
        self.keep_records = keep_records
        self.dice = dice
        self.process_group = process_group
        first = 0 if (include_background or num_classes == 1) else 1
        self.classes: tuple[int, ...] = tuple(range(first, num_classes))
        self._device = torch.device("cpu")
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def num_used_classes(self) -> int:
        """C': the number of classes the statistics cover."""
        return len(self.classes)

    def _config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes, "num_bins": self.num_bins,
            "include_background": self.include_background, "to_onehot_y": self.to_onehot_y,
            "softmax": self.softmax, "sigmoid": self.sigmoid, "ignore_index": self.ignore_index,
            "right": self.right,
        }

    def reset(self) -> None:
        """Forget everything seen so far (state back to zeros, records emptied)."""
        Cp, M, dev = self.num_used_classes, self.num_bins, self._device
        f64 = {"dtype": torch.float64, "device": dev}
        i64 = {"dtype": torch.int64, "device": dev}
        self.count = torch.zeros(Cp, M, **f64)
        self.sum_p = torch.zeros(Cp, M, **f64)
        self.sum_y = torch.zeros(Cp, M, **f64)
        self.macro_sum = torch.zeros(3, Cp, **f64)  # per-image ece, ace, mce summed over images (NaN skipped)
        self.macro_n = torch.zeros(3, Cp, **i64)  # images where each value is defined
        self.hist = torch.zeros(Cp, M, M, **i64)
        self.num_images = torch.zeros((), **i64)
        self._records: list[dict[str, Any]] = []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The accumulated sums (local to this process), by name; their total size is O(C'·M²)."""
        return {k: getattr(self, k) for k in (*_FLOAT_STATE, *_INT_STATE)}

    def to(self, device: torch.device | str) -> DatasetCalibration:
        """Move the state to ``device`` (``update`` does this by itself to follow its inputs)."""
        self._device = torch.device(device)
        for k, v in self.state_tensors().items():
            setattr(self, k, v.to(self._device))
        return self

    def state_dict(self) -> dict[str, Any]:
        """The configuration and accumulated sums (and records, if kept), for checkpoints and resumption."""
        sd: dict[str, Any] = {"config": self._config()}
        sd.update({k: v.detach().cpu().clone() for k, v in self.state_tensors().items()})
        if self.keep_records:
            sd["records"] = [dict(r) for r in self._records]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration must match this object's."""
        cfg = state_dict.get("config")
        if cfg != self._config():
            raise ValueError(f"state_dict config {cfg} does not match this metric's {self._config()}")
        for k, ref in self.state_tensors().items():
            if k not in state_dict:
                raise ValueError(f"state_dict lacks {k!r}")
            v = torch.as_tensor(state_dict[k])
            if v.shape != ref.shape:
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
            setattr(self, k, v.to(device=self._device, dtype=ref.dtype).clone())
        self._records = [dict(r) for r in state_dict.get("records", [])]

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(
        self, input: torch.Tensor, target: torch.Tensor, image_ids: Sequence[Any] | None = None
    ) -> None:
        """Add one batch: ``input`` (B, C, *spatial) probabilities (or logits with softmax/sigmoid) and
        ``target`` as in :func:`calibops.functional.binned_stats`. Spatial sizes may change between calls.

        ``image_ids`` (B names/numbers) label the per-image records; default: a running index.
        """
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 2 or input.shape[1] != self.num_classes:
            raise ValueError(
                f"input must have shape (B, {self.num_classes}, *spatial) for "
                f"num_classes={self.num_classes}, got {tuple(input.shape)}"
            )
        B = input.shape[0]
        if image_ids is not None and len(image_ids) != B:
            raise ValueError(f"image_ids has {len(image_ids)} entries for a batch of {B} images")
        input = input.detach()
        stats = F.binned_stats(
            input, target, num_bins=self.num_bins, binning="hard", include_background=True,
            to_onehot_y=self.to_onehot_y, softmax=self.softmax, sigmoid=self.sigmoid,
            ignore_index=self.ignore_index, right=self.right, backend=self.backend, validate=self.validate,
        )
        # drop the background here (not in binned_stats) so a one-channel input keeps its class silently
        first = self.classes[0]
        stats = BinnedStats(stats.count[:, first:], stats.sum_p[:, first:], stats.sum_y[:, first:])
        if stats.count.device != self._device:
            self.to(stats.count.device)
        errs = calibration_errors_from_stats(stats)  # (B, C') each, NaN where undefined
        per_image = torch.stack([e.double() for e in errs])  # [3, B, C']
        defined = ~torch.isnan(per_image)
        self.macro_sum += torch.where(defined, per_image, torch.zeros_like(per_image)).sum(1)
        self.macro_n += defined.sum(1)
        self.count += stats.count.double().sum(0)
        self.sum_p += stats.sum_p.double().sum(0)
        self.sum_y += stats.sum_y.double().sum(0)
        self.hist += reliability_histogram_counts(stats, self.right)
        start = int(self.num_images) if self.keep_records else 0
        self.num_images += B
        if self.keep_records:
            self._add_records(input, target, stats, errs, start, image_ids)

    def _add_records(self, input, target, stats, errs, start, image_ids) -> None:
        B = input.shape[0]
        voxels = stats.count.sum(-1).cpu()
        vals = [e.cpu() for e in errs]
        dice = self._dice(input, target).cpu() if self.dice else None
        for b in range(B):
            ident = image_ids[b] if image_ids is not None else start + b
            for k, c in enumerate(self.classes):
                rec: dict[str, Any] = {"image": ident, "class": c}
                for name, v in zip(_METRICS, vals, strict=True):
                    rec[name] = float(v[b, k])
                rec["voxels"] = int(voxels[b, k])
                if dice is not None:
                    rec["dice"] = float(dice[b, k])
                self._records.append(rec)

    def _dice(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice of the hard prediction per (image, used class), (B, C') float64; NaN when both are empty."""
        B, C = input.shape[0], input.shape[1]
        x = input.reshape(B, C, -1)
        keep = None
        if self.to_onehot_y:
            lab = target.reshape(B, -1).long()
            if self.ignore_index is not None:
                keep = lab != self.ignore_index
        else:
            dense = target.reshape(B, C, -1)
        multiclass = C > 1 and not self.sigmoid
        if multiclass:
            pred_cls = x.argmax(1)  # softmax is monotone: argmax of logits = argmax of probabilities
        out = torch.empty(B, len(self.classes), dtype=torch.float64, device=input.device)
        for k, c in enumerate(self.classes):
            if multiclass:
                pred = pred_cls == c
            elif self.sigmoid:
                pred = x[:, c] > 0  # sigmoid(x) > 0.5
            else:
                pred = x[:, c] > 0.5
            pred = pred.double()
            y = (lab == c).double() if self.to_onehot_y else dense[:, c].double()
            if keep is not None:
                pred = pred * keep
                y = y * keep
            inter = (pred * y).sum(-1)
            den = pred.sum(-1) + y.sum(-1)
            nan = torch.full_like(den, float("nan"))
            out[:, k] = torch.where(den > 0, 2 * inter / den.clamp(min=1e-300), nan)
        return out

    # ---------------------------------------------------------------- results
    def _synced(self) -> dict[str, torch.Tensor]:
        """State summed over all ranks when distributed (the local state is left untouched)."""
        state = self.state_tensors()
        if not _dist_ready(self.process_group):
            return state
        import torch.distributed as dist

        dev = self._device
        if dist.get_backend(self.process_group) == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        fbuf = torch.cat([state[k].reshape(-1) for k in _FLOAT_STATE]).to(dev)
        ibuf = torch.cat([state[k].reshape(-1) for k in _INT_STATE]).to(dev)
        dist.all_reduce(fbuf, group=self.process_group)
        dist.all_reduce(ibuf, group=self.process_group)
        out: dict[str, torch.Tensor] = {}
        for names, buf in ((_FLOAT_STATE, fbuf), (_INT_STATE, ibuf)):
            off = 0
            for k in names:
                n = state[k].numel()
                out[k] = buf[off : off + n].view(state[k].shape).to(self._device)
                off += n
        return out

    def compute(self) -> DatasetCalibrationResult:
        """Macro and micro ECE/ACE/MCE per class, (C',) float32 each.

        When ``torch.distributed`` is initialised this is a collective: call it on every rank.
        """
        s = self._synced()
        n = s["macro_n"]
        nan = torch.full_like(s["macro_sum"], float("nan"))
        macro = torch.where(n > 0, s["macro_sum"] / n.clamp(min=1), nan)
        macro_errs = CalibrationErrors(*(m.float() for m in macro))
        micro = calibration_errors_from_stats(BinnedStats(s["count"], s["sum_p"], s["sum_y"]))
        micro_errs = CalibrationErrors(*(m.float() for m in micro))
        return DatasetCalibrationResult(
            macro_errs, micro_errs, int(s["num_images"]), self.classes, s["macro_n"][0].clone()
        )

    def histogram(self) -> torch.Tensor:
        """The dataset reliability histogram ``H[c, a, j]``, int64 (C', M, M): class, accuracy bin (0 =
        lowest), confidence bin. A collective when distributed: call it on every rank."""
        return self._synced()["hist"].clone()

    def pooled_counts(self) -> torch.Tensor:
        """Voxels per (class, confidence bin) over the data set, (C', M) float64 (summed over ranks)."""
        return self._synced()["count"].clone()

    def records(self, gather: bool = False) -> list[dict[str, Any]]:
        """Per-(image, class) records (``keep_records=True``): image, class, ece, ace, mce, voxels[, dice].

        ``gather=True`` collects every rank's records (a collective) and adds each record's ``rank``.
        """
        if not self.keep_records:
            raise RuntimeError("records are kept only with DatasetCalibration(..., keep_records=True)")
        recs = [dict(r) for r in self._records]
        if gather and _dist_ready(self.process_group):
            import torch.distributed as dist

            world = dist.get_world_size(self.process_group)
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, recs, group=self.process_group)
            recs = [dict(r, rank=rank) for rank, part in enumerate(parts) for r in part]
        return recs

    def write_records_csv(self, path: str | os.PathLike, gather: bool = False) -> None:
        """Write :meth:`records` to a CSV file (one row per image and class)."""
        recs = self.records(gather=gather)
        fields = ["image", "class", *_METRICS, "voxels"] + (["dice"] if self.dice else [])
        if recs and "rank" in recs[0]:
            fields.insert(0, "rank")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(recs)

    def plot(
        self,
        class_names: Sequence[str] | None = None,
        *,
        show_counts: bool = True,
        all_classes: bool = True,
        gamma: float = 0.5,
        cmap: str = "viridis",
        **kwargs: Any,
    ) -> Figure:
        """The dataset reliability histogram figure (:func:`calibops.plot.dataset_reliability_histogram`);
        the bars below show pooled voxels per confidence bin. ``class_names``: one name per used class
        (C'), or per input class (C, the background name is then dropped). A collective when distributed."""
        from .plot import dataset_reliability_histogram

        s = self._synced()
        names = None
        if class_names is not None:
            names = [str(n) for n in class_names]
            if len(names) == self.num_classes and self.num_used_classes != self.num_classes:
                names = [names[c] for c in self.classes]
        else:
            names = [f"class {c}" for c in self.classes]
        return dataset_reliability_histogram(
            s["hist"], counts=s["count"], class_names=names, all_classes=all_classes, gamma=gamma, cmap=cmap,
            show_counts=show_counts, **kwargs,
        )

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"DatasetCalibration({cfg}, images={int(self.num_images)})"
