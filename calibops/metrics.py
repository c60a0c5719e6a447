"""Dataset-level calibration: a constant-memory accumulator of per-image and pooled statistics.

:class:`DatasetCalibration` consumes batches of predictions and labels, runs the fused statistics kernel
(``calibops.functional.binned_stats``, hard bins, no gradient) and keeps only sums:

- pooled (micro) statistics ``count, sum_p, sum_y`` per (class, bin), float64: (C', M) each;
- sums of the per-image ECE/ACE/MCE and the number of images where each is defined (macro): (C',) each;
- the dataset reliability histogram ``H[c, a, j]`` (README, "Evaluating calibration over a test set"), int64:
  (C', M, M);
- per class, the number of images whose target holds the class, (C',);
- the number of images and of non-finite probability entries left out (``nonfinite="skip"`` or
  ``validate=False``).

That is O(C'·M²) memory whatever the number of images or voxels. Under ``torch.distributed`` the sums are
all-reduced (two collectives) in :meth:`~DatasetCalibration.compute` / :meth:`~DatasetCalibration.histogram`,
so every rank gets the result of one process seeing all the data (gloo and nccl).

Optionally (``keep_records=True``) one record per (image, class) with ECE/ACE/MCE (and Dice with
``dice=True``) is kept for a per-image CSV; that list grows with the data set and is the one exception.
The metric formulas are not repeated here: per-image and pooled errors both come from
:func:`calibops.reference.calibration_errors_from_stats`.

*Micro* pools the sums: per (class, bin), ``count``, ``sum_p`` and ``sum_y`` are added over all images and the
gap is ``|Σ sum_p / Σ count - Σ sum_y / Σ count|``, so every voxel weighs the same. (The 2025 paper's code
instead averages each bin's per-image confidences and accuracies unweighted over images; see the README.)
"ACE" is the *average* calibration error (mean gap over non-empty bins), not the *adaptive* one.

Non-finite probabilities (NaN/inf logits) are left out of every statistic by the kernels and counted. With
``validate=True`` and ``nonfinite="raise"`` (the defaults) an update holding any raises a ``ValueError`` that
names the image, and adds nothing (everything accumulated before is kept); ``nonfinite="skip"`` leaves them out
with a warning naming the images; either way :meth:`DatasetCalibration.compute` reports how many were left
out (``nonfinite``), so no metric goes NaN, silently or otherwise.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import functional as F
from ._options import as_bool, as_int, check_options
from .reference import (
    ACT_NONE,
    ACT_SIGMOID,
    ACT_SOFTMAX,
    BinnedStats,
    CalibrationErrors,
    bin_edges,
    calibration_errors_from_stats,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["DatasetCalibration", "DatasetCalibrationResult", "reliability_histogram_counts"]

_FLOAT_STATE = ("count", "sum_p", "sum_y", "macro_sum")
_INT_STATE = ("macro_n", "hist", "num_images", "images_with_class", "num_nonfinite")
_NONFINITE = ("raise", "skip")
_METRICS = ("ece", "ace", "mce")


class DatasetCalibrationResult(NamedTuple):
    """Dataset calibration errors, each field a ``CalibrationErrors(ece, ace, mce)`` of (C',) float32.

    ``macro``: mean over images of the per-image values (images where a value is NaN are skipped; NaN if no
    image has it). ``micro``: the same formulas on the statistics summed over all images (pooled sums).
    ``num_images``: images seen (over all ranks when distributed). ``classes``: the class index of each of
    the C' entries. ``images_per_class``: (C',) int64, the number of images each class's macro ECE/ACE/MCE
    average over: images with at least one voxel in the statistics (not ignored, finite probability). That
    is every such image for every class, *whether or not the class appears in its target*: calibration is
    defined for a class's probabilities wherever there are voxels. ``images_with_class``: (C',) int64, images
    whose target holds the class (at least one voxel of it in the statistics: Σ y > 0).
    ``nonfinite``: probability entries left out because they were NaN or infinite (0 unless
    ``nonfinite="skip"`` or ``validate=False``).
    """

    macro: CalibrationErrors
    micro: CalibrationErrors
    num_images: int
    classes: tuple[int, ...]
    images_per_class: torch.Tensor
    images_with_class: torch.Tensor
    nonfinite: int


def reliability_histogram_counts(stats: BinnedStats, right: bool = False) -> torch.Tensor:
    """The dataset reliability histogram contribution of per-image hard statistics (B, C, M).

    For every image b, class c and non-empty confidence bin j, the bin accuracy ``S_y/n`` (float32, as the
    statistics) is binned with the same edges and ``right`` rule as the confidences; returns int64
    ``H[c, a, j]`` (C, M, M) counting those (image, bin) pairs, accuracy bin 0 = lowest accuracy.
    """
    count, sum_y = stats.count, stats.sum_y
    if count.dim() != 3 or count.shape != sum_y.shape:
        raise ValueError(f"stats must be (B, C, M) tensors, got count {tuple(count.shape)}, sum_y {tuple(sum_y.shape)}")
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
        num_bins: M, hard confidence bins (the edges of README "Semantics"), also used for the accuracy axis
            of the histogram.
        include_background: keep class 0 (default False, like the papers' evaluation). C' = C - 1 without it
            (C' = C = 1 for a single-channel prediction).
        to_onehot_y: targets are integer label maps (B, 1, *spatial) or (B, *spatial).
        softmax / sigmoid: the predictions are logits; apply this activation first.
        ignore_index: label value left out of every statistic (needs ``to_onehot_y``).
        right: bin edge rule (README "Semantics").
        backend: statistics backend (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``); an
            unknown name raises here, an unavailable one at the first update.
        validate: value checks of :func:`calibops.functional.binned_stats` (probabilities in [0, 1], labels in
            range, finite probabilities); keep them on for evaluation.
        nonfinite: what a NaN/inf probability does when validating: ``"raise"`` (default) a ``ValueError``
            naming the image, nothing of that batch added; ``"skip"`` leave it out of every statistic, count
            it (``compute().nonfinite``) and warn with the images. With ``validate=False`` they are left out
            and counted without a check (no host synchronisation).
        keep_records: keep one record per (image, class) with ECE/ACE/MCE (O(images·C') memory).
        dice: add the Dice score of the hard prediction (argmax, or ``p > 0.5`` for sigmoid / one channel)
            to the records (needs ``keep_records``).
        process_group: the ``torch.distributed`` group to reduce over (default: the world).
        mode: ``"marginal"`` (default; per class, C' rows) or ``"top_label"`` (per voxel the confidence
            ``max_c p`` and whether its argmax class is the label, as torchmetrics' ``MulticlassCalibrationError``
            and the CURVAS challenge; one row). Top-label results drop the class axis: ``compute()`` errors are
            0-d, ``histogram()`` is (M, M), records have ``class="top_label"``; ``include_background`` does not
            apply (the argmax runs over every class) and ``dice`` is not available.

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
        nonfinite: str = "raise",
        *,
        mode: str = "marginal",
    ) -> None:
        try:
            num_classes = as_int("num_classes", num_classes)
        except TypeError as exc:
            raise TypeError(f"{exc}; num_classes must be an int >= 1") from None
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        o = check_options(
            num_bins=num_bins,
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            softmax=softmax,
            sigmoid=sigmoid,
            ignore_index=ignore_index,
            right=right,
            backend=backend,
            validate=validate,
            mode=mode,
        )
        keep_records = as_bool("keep_records", keep_records)
        dice = as_bool("dice", dice)
        if not isinstance(nonfinite, str):
            raise TypeError(f"nonfinite must be one of {_NONFINITE}, got {type(nonfinite).__name__}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if dice and o.mode == "top_label":
            raise ValueError("dice=True reports Dice per class: use mode='marginal' for it")
        if dice and not keep_records:
            raise ValueError("dice=True adds Dice to the per-image records: pass keep_records=True as well")
        # the statistics keep the background; it is dropped in update (a one-channel input keeps its class)
        self._opts = o._replace(include_background=True, binning="hard")
        self.num_classes = num_classes
        self.num_bins = o.num_bins
        self.mode = o.mode
        self.include_background = o.include_background
        self.to_onehot_y = o.to_onehot_y
        self.softmax = o.softmax
        self.sigmoid = o.sigmoid
        self.ignore_index = o.ignore_index
        self.right = o.right
        self.backend = o.backend
        self.validate = o.validate
        self.keep_records = keep_records
        self.dice = dice
        self.nonfinite = nonfinite
        self.process_group = process_group
        first = 0 if (self.include_background or num_classes == 1) else 1
        #: the class index of each statistic row (marginal), or () for top-label (one row, no class axis)
        self.classes: tuple[int, ...] = tuple(range(first, num_classes)) if o.mode == "marginal" else ()
        self._device = torch.device("cpu")
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def num_used_classes(self) -> int:
        """C': the number of classes the statistics cover (marginal), or 1 (top-label: one row)."""
        return len(self.classes) if self.mode == "marginal" else 1

    def _config(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "num_bins": self.num_bins,
            "include_background": self.include_background,
            "to_onehot_y": self.to_onehot_y,
            "softmax": self.softmax,
            "sigmoid": self.sigmoid,
            "ignore_index": self.ignore_index,
            "right": self.right,
            "mode": self.mode,
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
        self.images_with_class = torch.zeros(Cp, **i64)  # images whose target holds the class
        self.num_nonfinite = torch.zeros((), **i64)  # probability entries left out as NaN/inf
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
        """Restore :meth:`state_dict` output; the configuration must match this object's.

        Everything is checked before anything is replaced (a bad state dict leaves this object as it was):
        every key present with its shape, real values, finite and >= 0, whole numbers for the counters, and
        sums that fit together (``sum_p``, ``sum_y`` within ``[0, count]``, per-image counters within
        ``num_images``, macro sums within their image counts since every error is in [0, 1], and a pooled bin
        non-empty exactly where the histogram has an entry). A violation is a ``ValueError`` naming the key.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from DatasetCalibration.state_dict(), got {type(state_dict)}")
        cfg = state_dict.get("config")
        if isinstance(cfg, dict) and "mode" not in cfg:  # written before top-label existed: marginal
            cfg = {**cfg, "mode": "marginal"}
        if cfg != self._config():
            raise ValueError(f"state_dict config {cfg} does not match this metric's {self._config()}")
        new: dict[str, torch.Tensor] = {}
        for k, ref in self.state_tensors().items():
            if k not in state_dict:
                raise ValueError(f"state_dict lacks {k!r}")
            try:
                v = torch.as_tensor(state_dict[k]).detach().cpu()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"state_dict[{k!r}] is not a tensor of numbers ({exc})") from None
            if v.shape != ref.shape:
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(v.shape)}, expected {tuple(ref.shape)}")
            if v.dtype == torch.bool or v.is_complex():
                raise ValueError(f"state_dict[{k!r}] must hold real numbers, got {v.dtype}")
            v64 = v.double()
            if not bool(torch.isfinite(v64).all()) or bool((v64 < 0).any()):
                raise ValueError(f"state_dict[{k!r}] must be finite and >= 0 (a sum of counts and errors)")
            if k in _INT_STATE and not bool((v64 == v64.round()).all()):
                raise ValueError(f"state_dict[{k!r}] must hold whole numbers (it counts images or bins)")
            new[k] = v
        self._check_consistent({k: v.double() for k, v in new.items()})
        records = state_dict.get("records", [])
        if "records" in state_dict and self.keep_records:
            expected = int(new["num_images"]) * self.num_used_classes
            if not isinstance(records, list) or len(records) != expected:
                n = len(records) if isinstance(records, list) else type(records).__name__
                raise ValueError(f"state_dict['records'] has {n} records, expected num_images x classes = {expected}")
        for k, ref in self.state_tensors().items():
            setattr(self, k, new[k].to(device=self._device, dtype=ref.dtype).clone())
        self._records = [dict(r) for r in records]

    @staticmethod
    def _check_consistent(s: dict[str, torch.Tensor]) -> None:
        """The relations between the sums every real accumulation satisfies (float64 copies, on the CPU)."""
        n, tol = s["count"], 1e-5  # relative slack: float32 per-image sums are added in float64
        for k in ("sum_p", "sum_y"):
            if bool((s[k] > n * (1 + tol) + tol).any()):
                raise ValueError(f"state_dict[{k!r}] exceeds state_dict['count'] in some bin (p and y lie in [0, 1])")
        images = s["num_images"]
        for k in ("macro_n", "images_with_class"):
            if bool((s[k] > images).any()):
                raise ValueError(f"state_dict[{k!r}] exceeds state_dict['num_images'] = {int(images)}")
        if bool((s["images_with_class"] > s["macro_n"][0]).any()):
            raise ValueError("state_dict['images_with_class'] exceeds state_dict['macro_n'][0] (images with voxels)")
        if bool((s["macro_sum"] > s["macro_n"] * (1 + tol) + tol).any()):
            raise ValueError("state_dict['macro_sum'] exceeds state_dict['macro_n'] (every error lies in [0, 1])")
        column = s["hist"].sum(1)  # (C', M): images in which each (class, bin) was non-empty
        if bool((column > images).any()):
            raise ValueError(f"state_dict['hist'] counts more than num_images = {int(images)} images in a bin")
        if not torch.equal(column > 0, n > 0):
            raise ValueError("state_dict['hist'] and state_dict['count'] disagree on which bins hold voxels")

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, input: torch.Tensor, target: torch.Tensor, image_ids: Sequence[Any] | None = None) -> None:
        """Add one batch: ``input`` (B, C, *spatial) probabilities (or logits with softmax/sigmoid) and
        ``target`` as in :func:`calibops.functional.binned_stats`. Spatial sizes may change between calls.

        ``image_ids`` (B names/numbers) label the per-image records and error messages; default: a running
        index. Everything is checked before the state changes: a batch that raises adds nothing.
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
        run = F._stats(input, target, self._opts, raise_nonfinite=False)
        if run.counts is not None:  # validated: the counts are on the host already (one synchronisation)
            nonfinite: int | torch.Tensor = run.counts[1]
            if nonfinite > 0:
                self._report_nonfinite(input, target, image_ids)
        else:  # not validated: count on the device, no synchronisation
            nonfinite = run.bad[1]
        stats = run.stats
        if self.mode == "top_label":  # one row per image: (B, M) -> (B, 1, M)
            stats = BinnedStats(*(t.unsqueeze(1) for t in stats))
        else:
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
        self.images_with_class += (stats.sum_y.sum(-1) > 0).sum(0)
        self.num_nonfinite += nonfinite
        start = int(self.num_images) if self.keep_records else 0
        self.num_images += B
        if self.keep_records:
            self._add_records(input, target, stats, errs, start, image_ids)

    def _report_nonfinite(self, input: torch.Tensor, target: torch.Tensor, image_ids: Sequence[Any] | None) -> None:
        """Slow path, taken only when a batch holds non-finite probabilities: find the images (one statistics
        call per image, same backend and rule) and raise (``nonfinite="raise"``) or warn (``"skip"``)."""
        opts = self._opts._replace(validate=False)
        per_image = [int(F._stats(input[b : b + 1], target[b : b + 1], opts).bad[1]) for b in range(input.shape[0])]
        seen = int(self.num_images)
        found = [(image_ids[b] if image_ids is not None else seen + b, b, n) for b, n in enumerate(per_image) if n > 0]
        act = {ACT_SOFTMAX: "softmax", ACT_SIGMOID: "sigmoid", ACT_NONE: "no activation"}[
            ACT_SOFTMAX if self.softmax else ACT_SIGMOID if self.sigmoid else ACT_NONE
        ]
        where = ", ".join(f"image {ident!r} (batch position {b}): {n}" for ident, b, n in found[:5])
        where += f", ... ({len(found) - 5} more images)" if len(found) > 5 else ""
        total = sum(per_image)
        if self.nonfinite == "raise":
            raise ValueError(
                f"input holds {total} non-finite probability value(s) after {act} (NaN or infinite logits): {where}. "
                f"Nothing of this batch was added (the {seen} images before it are kept). Fix the predictions, or "
                "pass nonfinite='skip' to leave such values out of the statistics and count them"
            )
        warnings.warn(
            f"DatasetCalibration: left out {total} non-finite probability value(s) after {act}: {where} "
            "(counted in compute().nonfinite)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _add_records(self, input, target, stats, errs, start, image_ids) -> None:
        B = input.shape[0]
        voxels = stats.count.sum(-1).cpu()
        vals = [e.cpu() for e in errs]
        dice = self._dice(input, target).cpu() if self.dice else None
        for b in range(B):
            ident = image_ids[b] if image_ids is not None else start + b
            for k, c in enumerate(self.classes or ("top_label",)):
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
        # voxels left out of the statistics as non-finite (nonfinite="skip") are left out of Dice as well
        if self.softmax:
            finite = ~(torch.isnan(x) | torch.isposinf(x)).any(1) & ~torch.isneginf(x).all(1)
        elif self.sigmoid:
            finite = ~torch.isnan(x).any(1)
        else:
            finite = torch.isfinite(x).all(1)
        keep = finite if keep is None else keep & finite
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
        per_class = (s["macro_n"][0].clone(), s["images_with_class"].clone())
        if self.mode == "top_label":  # drop the one-row axis
            macro_errs = CalibrationErrors(*(m[0] for m in macro_errs))
            micro_errs = CalibrationErrors(*(m[0] for m in micro_errs))
            per_class = tuple(t[0] for t in per_class)
        return DatasetCalibrationResult(
            macro_errs,
            micro_errs,
            int(s["num_images"]),
            self.classes,
            *per_class,
            int(s["num_nonfinite"]),
        )

    def histogram(self) -> torch.Tensor:
        """The dataset reliability histogram ``H[c, a, j]``, int64 (C', M, M): class, accuracy bin (0 =
        lowest), confidence bin. A collective when distributed: call it on every rank."""
        hist = self._synced()["hist"].clone()
        return hist[0] if self.mode == "top_label" else hist

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
        elif self.mode == "top_label":
            names = ["top-label"]
        else:
            names = [f"class {c}" for c in self.classes]
        if self.mode == "top_label" and len(names) != 1:
            raise ValueError(f"class_names: a top-label histogram has one row; pass one name or None, got {names}")
        return dataset_reliability_histogram(
            s["hist"],
            counts=s["count"],
            class_names=names,
            all_classes=all_classes,
            gamma=gamma,
            cmap=cmap,
            show_counts=show_counts,
            **kwargs,
        )

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"DatasetCalibration({cfg}, nonfinite={self.nonfinite!r}, images={int(self.num_images)})"
