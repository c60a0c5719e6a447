"""Dataset-level calibration: a constant-memory accumulator of per-image and pooled statistics.

:class:`DatasetCalibration` consumes batches of predictions and labels, runs the fused statistics kernel
(``calibops.functional.binned_stats``, hard bins, no gradient) and keeps only sums. It is split by job:

- :mod:`calibops._state` (:class:`~calibops._state.SumState`): the named sum tensors, their device, the **one**
  all-reduce that sums them over ``torch.distributed`` ranks (gloo and nccl) and the checks of a loaded state;
- :mod:`calibops._dataset_results`: the dataset formulas on the summed state (macro / micro errors, groups and
  gaps, bootstrap, Brier, adaptive bins), built on the per-bin formulas of :mod:`calibops.reference` and
  :mod:`calibops.evaluation` — never repeated here;
- :mod:`calibops._records`: the optional per-(image, class) records (CSV, gathering, Dice);
- :mod:`calibops._report` / :mod:`calibops.plot`: figures.

The sums (all O(C'·M²) whatever the number of images or voxels):

- pooled (micro) statistics ``count, sum_p, sum_y`` per (class, bin), float64: (C', M) each;
- sums of the per-image ECE/ACE/MCE (``macro_sum``, (3, C')) and L2 (``macro_l2``, (C',)) and the number of
  images where each is defined (``macro_n``, (3, C'));
- the dataset reliability histogram ``H[c, a, j]`` (README, "Evaluating a test set"), int64:
  (C', M, M);
- per class, the number of images whose target holds the class, (C',);
- the number of images and of non-finite probability entries left out (``nonfinite="skip"`` or
  ``validate=False``);
- with ``groups``: the same pooled statistics, macro sums and histogram per group, (G, ...);
- with ``adaptive_bins``: pooled statistics over ``fine_bins`` fine bins, (C', F), for equal-mass binning.

Optionally (``keep_records=True``) one record per (image, class) with ECE/ACE/MCE/L2 (and Dice with
``dice=True``, the group with ``groups``) is kept for a per-image CSV and bootstrap intervals; that list grows
with the data set and is the one exception.

*Micro* pools the sums: per (class, bin), ``count``, ``sum_p`` and ``sum_y`` are added over all images and the
gap is ``|Σ sum_p / Σ count - Σ sum_y / Σ count|``, so every voxel weighs the same. (The 2025 paper's code
instead averages each bin's per-image confidences and accuracies unweighted over images; see docs/evaluation.md.)
"ACE" is the *average* calibration error (mean gap over non-empty bins), not the *adaptive* one (that one is
:meth:`DatasetCalibration.adaptive_errors`).

Classification (``classification=True``): every update is a batch of samples, input (B, C) with (B,) labels or
(B, C) one-hot targets; all samples form one pooled population (``compute().micro``); per-image (macro) values
and the per-image histogram do not exist there.

Non-finite probabilities (NaN/inf logits) are left out of every statistic by the kernels and counted. With
``validate=True`` and ``nonfinite="raise"`` (the defaults) an update holding any raises a ``ValueError`` that
names the image, and adds nothing (everything accumulated before is kept); ``nonfinite="skip"`` leaves them out
with a warning naming the images; either way :meth:`DatasetCalibration.compute` reports how many were left
out (``nonfinite``), so no metric goes NaN, silently or otherwise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import _dataset_results as R
from . import functional as F
from ._dataset_results import DatasetCalibrationResult, GroupGap, GroupResult
from ._options import as_bool, as_int, check_options
from ._records import ImageRecords, hard_dice
from ._state import SumState, dist_ready
from .evaluation import BrierDecomposition, brier_decomposition
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

__all__ = [
    "DatasetCalibration",
    "DatasetCalibrationResult",
    "GroupGap",
    "GroupResult",
    "reliability_histogram_counts",
]

_NONFINITE = ("raise", "skip")
_METRICS = ("ece", "ace", "mce")
R.METRICS = ("ece", "ace", "mce", "l2")
_NAN_OK = ("macro_l2", "group_macro_l2")  # unknown (NaN) after loading a checkpoint written before L2 existed


def _dist_ready(process_group: Any) -> bool:  # kept for callers of the old private name
    return dist_ready(process_group)


def reliability_histogram_counts(stats: BinnedStats, right: bool = False, per_image: bool = False) -> torch.Tensor:
    """The dataset reliability histogram contribution of per-image hard statistics (B, C, M).

    For every image b, class c and non-empty confidence bin j, the bin accuracy ``S_y/n`` (float32, as the
    statistics) is binned with the same edges and ``right`` rule as the confidences; returns int64
    ``H[c, a, j]`` (C, M, M) counting those (image, bin) pairs, accuracy bin 0 = lowest accuracy
    (``per_image=True``: one histogram per image, (B, C, M, M)).
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
    if per_image:
        flat = flat + torch.arange(B, device=count.device).view(B, 1, 1) * (C * M * M)
        return torch.bincount(flat[valid], minlength=B * C * M * M).view(B, C, M, M).to(torch.int64)
    return torch.bincount(flat[valid], minlength=C * M * M).view(C, M, M).to(torch.int64)


class DatasetCalibration:
    """Calibration of a segmentation (or classification) model over a whole data set, in O(C'·M²) memory.

    Args:
        num_classes: C, the number of channels of the predictions.
        num_bins: M, hard confidence bins (the edges of docs/usage.md "Semantics"), also used for the accuracy axis
            of the histogram.
        include_background: keep class 0 (default False, like the papers' evaluation). C' = C - 1 without it
            (C' = C = 1 for a single-channel prediction).
        to_onehot_y: targets are integer label maps (B, 1, *spatial) or (B, *spatial).
        softmax / sigmoid: the predictions are logits; apply this activation first.
        ignore_index: label value left out of every statistic (needs ``to_onehot_y``).
        right: bin edge rule (docs/usage.md "Semantics").
        backend: statistics backend (``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``); an
            unknown name raises here, an unavailable one at the first update.
        validate: value checks of :func:`calibops.functional.binned_stats` (probabilities in [0, 1], labels in
            range, finite probabilities); keep them on for evaluation.
        nonfinite: what a NaN/inf probability does when validating: ``"raise"`` (default) a ``ValueError``
            naming the image, nothing of that batch added; ``"skip"`` leave it out of every statistic, count
            it (``compute().nonfinite``) and warn with the images. With ``validate=False`` they are left out
            and counted without a check (no host synchronisation).
        keep_records: keep one record per (image, class) with ECE/ACE/MCE/L2 (O(images·C') memory); needed by
            :meth:`bootstrap`.
        dice: add the Dice score of the hard prediction (argmax, or ``p > 0.5`` for sigmoid / one channel)
            to the records (needs ``keep_records``).
        process_group: the ``torch.distributed`` group to reduce over (default: the world).
        mode: ``"marginal"`` (default; per class, C' rows) or ``"top_label"`` (per voxel the confidence
            ``max_c p`` and whether its argmax class is the label, as torchmetrics' ``MulticlassCalibrationError``
            and the CURVAS challenge; one row). Top-label results drop the class axis: ``compute()`` errors are
            0-d, ``histogram()`` is (M, M), records have ``class="top_label"``; ``include_background`` does not
            apply (the argmax runs over every class) and ``dice`` is not available.
        classification: every update is a batch of samples, input (B, C) with target (B,) class indices (or
            (B, C) one-hot); all samples are pooled (``compute().micro``; macro is NaN). ``include_background``
            should then be True (class 0 is an ordinary class); records, Dice and ``histogram()`` do not apply
            (use :meth:`plot`, a reliability diagram of the pooled samples).
        groups: names of the subgroups (e.g. ``("site A", "site B")``); every update then takes ``groups=``, one
            name per image, and :meth:`compute_groups`, :meth:`group_gaps`, :meth:`bootstrap` and
            :meth:`plot_groups` report per group.
        adaptive_bins: also keep pooled statistics over ``fine_bins`` fine uniform bins (one more statistics
            pass per update) for :meth:`adaptive_errors`, the equal-mass ("adaptive") calibration error with
            this many bins.
        fine_bins: resolution of the fine histogram behind ``adaptive_bins`` (default 1000).
        brier: also accumulate the Brier score (per image, macro, and pooled, micro) and the second moments for
            :meth:`brier_decomposition` (needs ``to_onehot_y``: binary targets, ``y² = y``). See :meth:`brier`.
        multi_rater: targets are R rater label maps (B, R, *spatial) (needs ``to_onehot_y``; R may change between
            updates). Macro values are the mean over images of the *mean over raters* of the per-rater errors (the
            CURVAS protocol); the pooled statistics, micro values and histogram use the rater-mean soft label
            ``ȳ = mean_r [label_r = c]``. Records (marginal mode) add ``volume_crps`` (closed form, against the
            raters' volumes; voxel size from ``update(..., spacing=...)``) and ``consensus_dice``.

    Example::

        metric = DatasetCalibration(num_classes=4, to_onehot_y=True, softmax=True)
        for logits, labels in loader:
            metric.update(model(images), labels)
        res = metric.compute()          # res.macro.ece, res.micro.ace, res.micro.l2 ... each (C',)
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
        classification: bool = False,
        groups: Sequence[Hashable] | None = None,
        adaptive_bins: int | None = None,
        fine_bins: int = 1000,
        multi_rater: bool = False,
        brier: bool = False,
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
            multi_rater=multi_rater,
        )
        keep_records = as_bool("keep_records", keep_records)
        dice = as_bool("dice", dice)
        classification = as_bool("classification", classification)
        if not isinstance(nonfinite, str):
            raise TypeError(f"nonfinite must be one of {_NONFINITE}, got {type(nonfinite).__name__}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if dice and o.mode == "top_label":
            raise ValueError("dice=True reports Dice per class: use mode='marginal' for it")
        if dice and not keep_records:
            raise ValueError("dice=True adds Dice to the per-image records: pass keep_records=True as well")
        if classification and (keep_records or dice):
            raise ValueError(
                "classification=True pools the samples into one population: per-image records and Dice do not "
                "apply (pass keep_records=False, dice=False)"
            )
        if groups is not None:
            if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
                raise TypeError(f"groups must be a sequence of group names, got {groups!r}")
            groups = tuple(groups)
            if len(groups) < 1 or len(set(groups)) != len(groups):
                raise ValueError(f"groups must hold at least one name, each once, got {groups!r}")
        if adaptive_bins is not None:
            adaptive_bins = as_int("adaptive_bins", adaptive_bins)
            fine_bins = as_int("fine_bins", fine_bins)
            if adaptive_bins < 1 or fine_bins < adaptive_bins:
                raise ValueError(
                    f"adaptive_bins must be >= 1 and fine_bins >= adaptive_bins, got {adaptive_bins}, {fine_bins}"
                )
            check_options(num_bins=fine_bins)
        # the statistics keep the background; it is dropped in update (a one-channel input keeps its class)
        self._opts = o._replace(include_background=True, binning="hard", moments=False)
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
        self.classification = classification
        self.multi_rater = o.multi_rater
        self.brier_score = as_bool("brier", brier)
        if self.brier_score and not (o.to_onehot_y or classification):
            raise ValueError("brier=True needs integer labels (to_onehot_y=True), whose squares are themselves")
        if self.brier_score:
            self._opts = self._opts._replace(moments=True)
        if self.multi_rater and dice:
            raise ValueError(
                "dice=True compares with one label map: with multi_rater=True the records carry consensus_dice"
            )
        if self.multi_rater and classification:
            raise ValueError("multi_rater=True reads rater label maps of images: not with classification=True")
        self.groups: tuple[Hashable, ...] | None = groups
        self.adaptive_bins = adaptive_bins
        self.fine_bins = fine_bins if adaptive_bins is not None else None
        first = 0 if (self.include_background or num_classes == 1) else 1
        #: the class index of each statistic row (marginal), or () for top-label (one row, no class axis)
        self.classes: tuple[int, ...] = tuple(range(first, num_classes)) if o.mode == "marginal" else ()
        self._state = SumState(self._state_spec(), nan_ok=_NAN_OK)
        self._records = ImageRecords()
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def num_used_classes(self) -> int:
        """C': the number of classes the statistics cover (marginal), or 1 (top-label: one row)."""
        return len(self.classes) if self.mode == "marginal" else 1

    def _state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        Cp, M = self.num_used_classes, self.num_bins
        f64, i64 = torch.float64, torch.int64
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "count": ((Cp, M), f64),
            "sum_p": ((Cp, M), f64),
            "sum_y": ((Cp, M), f64),
            "macro_sum": ((3, Cp), f64),  # per-image ece, ace, mce summed over images (NaN skipped)
            "macro_l2": ((Cp,), f64),  # per-image L2 summed over the images counted in macro_n[0]
            "macro_n": ((3, Cp), i64),  # images where each value is defined
            "hist": ((Cp, M, M), i64),
            "num_images": ((), i64),
            "images_with_class": ((Cp,), i64),  # images whose target holds the class
            "num_nonfinite": ((), i64),  # probability entries left out as NaN/inf
        }
        if self.groups is not None:
            G = len(self.groups)
            spec.update(
                {
                    "group_count": ((G, Cp, M), f64),
                    "group_sum_p": ((G, Cp, M), f64),
                    "group_sum_y": ((G, Cp, M), f64),
                    "group_macro_sum": ((G, 3, Cp), f64),
                    "group_macro_l2": ((G, Cp), f64),
                    "group_macro_n": ((G, Cp), i64),
                    "group_hist": ((G, Cp, M, M), i64),
                    "group_images": ((G,), i64),
                }
            )
        if self.adaptive_bins is not None:
            Fb = self.fine_bins
            spec.update({"fine_count": ((Cp, Fb), f64), "fine_sum_p": ((Cp, Fb), f64), "fine_sum_y": ((Cp, Fb), f64)})
        if self.brier_score:
            spec.update({"sum_p2": ((Cp, M), f64), "sum_py": ((Cp, M), f64), "brier_sum": ((Cp,), f64)})
        return spec

    def __getattr__(self, name: str) -> Any:
        # the sums by name (metric.count, metric.hist, ...), as attributes like before the state was split out
        state = self.__dict__.get("_state")
        if state is not None and name in state.tensors:
            return state.tensors[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _config(self) -> dict[str, Any]:
        cfg = {
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
        # options added later appear only when used, so older checkpoints keep matching
        if self.classification:
            cfg["classification"] = True
        if self.multi_rater:
            cfg["multi_rater"] = True
        if self.brier_score:
            cfg["brier"] = True
        if self.groups is not None:
            cfg["groups"] = list(self.groups)
        if self.adaptive_bins is not None:
            cfg["adaptive_bins"] = self.adaptive_bins
            cfg["fine_bins"] = self.fine_bins
        return cfg

    def reset(self) -> None:
        """Forget everything seen so far (state back to zeros, records emptied)."""
        self._state.reset()
        self._records.clear()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The accumulated sums (local to this process), by name; their total size is O(C'·M²)."""
        return dict(self._state.tensors)

    def to(self, device: torch.device | str) -> DatasetCalibration:
        """Move the state to ``device`` (``update`` does this by itself to follow its inputs)."""
        self._state.to(device)
        return self

    @property
    def _device(self) -> torch.device:
        return self._state.device

    def state_dict(self) -> dict[str, Any]:
        """The configuration and accumulated sums (and records, if kept), for checkpoints and resumption."""
        sd: dict[str, Any] = {"config": self._config()}
        sd.update({k: v.detach().cpu().clone() for k, v in self.state_tensors().items()})
        if self.keep_records:
            sd["records"] = [dict(r) for r in self._records.rows]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the configuration must match this object's.

        Everything is checked before anything is replaced (a bad state dict leaves this object as it was):
        every key present with its shape, real values, finite and >= 0, whole numbers for the counters, and
        sums that fit together (``sum_p``, ``sum_y`` within ``[0, count]``, per-image counters within
        ``num_images``, macro sums within their image counts since every error is in [0, 1], and a pooled bin
        non-empty exactly where the histogram has an entry). A violation is a ``ValueError`` naming the key.
        A state dict written before the L2 error existed (no ``macro_l2``) loads with the macro L2 unknown
        (NaN); everything else is restored.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict from DatasetCalibration.state_dict(), got {type(state_dict)}")
        cfg = state_dict.get("config")
        if isinstance(cfg, dict) and "mode" not in cfg:  # written before top-label existed: marginal
            cfg = {**cfg, "mode": "marginal"}
        if cfg != self._config():
            raise ValueError(f"state_dict config {cfg} does not match this metric's {self._config()}")
        new = self._state.checked(state_dict, defaults={"macro_l2": float("nan")})
        self._check_consistent({k: v.double() for k, v in new.items()})
        records = state_dict.get("records", [])
        if "records" in state_dict and self.keep_records:
            expected = int(new["num_images"]) * self.num_used_classes
            if not isinstance(records, list) or len(records) != expected:
                n = len(records) if isinstance(records, list) else type(records).__name__
                raise ValueError(f"state_dict['records'] has {n} records, expected num_images x classes = {expected}")
        self._state.load(new)
        self._records.rows = [dict(r) for r in records]

    def _check_consistent(self, s: dict[str, torch.Tensor]) -> None:
        """The relations between the sums every real accumulation satisfies (float64 copies, on the CPU)."""
        tol = 1e-5  # relative slack: float32 per-image sums are added in float64
        prefixes = [""] + (["group_"] if self.groups is not None else []) + (["fine_"] if self.adaptive_bins else [])
        for pre in prefixes:
            n = s[pre + "count"]
            for k in ("sum_p", "sum_y"):
                if bool((s[pre + k] > n * (1 + tol) + tol).any()):
                    raise ValueError(
                        f"state_dict[{pre + k!r}] exceeds state_dict[{pre + 'count'!r}] in some bin (p and y lie in "
                        "[0, 1])"
                    )
        images = s["num_images"]
        for k in ("macro_n", "images_with_class"):
            if bool((s[k] > images).any()):
                raise ValueError(f"state_dict[{k!r}] exceeds state_dict['num_images'] = {int(images)}")
        if bool((s["images_with_class"] > s["macro_n"][0]).any()):
            raise ValueError("state_dict['images_with_class'] exceeds state_dict['macro_n'][0] (images with voxels)")
        if bool((s["macro_sum"] > s["macro_n"] * (1 + tol) + tol).any()):
            raise ValueError("state_dict['macro_sum'] exceeds state_dict['macro_n'] (every error lies in [0, 1])")
        l2 = s["macro_l2"]
        if bool((l2[~torch.isnan(l2)] > (s["macro_n"][0] * (1 + tol) + tol)[~torch.isnan(l2)]).any()):
            raise ValueError("state_dict['macro_l2'] exceeds state_dict['macro_n'][0] (every error lies in [0, 1])")
        if not self.classification:
            column = s["hist"].sum(1)  # (C', M): images in which each (class, bin) was non-empty
            if bool((column > images).any()):
                raise ValueError(f"state_dict['hist'] counts more than num_images = {int(images)} images in a bin")
            if not torch.equal(column > 0, s["count"] > 0):
                raise ValueError("state_dict['hist'] and state_dict['count'] disagree on which bins hold voxels")
        if self.groups is not None and int(s["group_images"].sum()) != int(images):
            raise ValueError("state_dict['group_images'] does not add up to state_dict['num_images']")

    # ----------------------------------------------------------------- update
    def _group_index(self, groups: Sequence[Hashable] | None, B: int) -> torch.Tensor | None:
        if self.groups is None:
            if groups is not None:
                raise ValueError("groups= given to update, but this metric was built without groups=(names...)")
            return None
        if groups is None:
            raise ValueError(f"this metric reports per group: pass update(..., groups=[...]) with one of {self.groups}")
        if isinstance(groups, (str, bytes)) or len(groups) != B:
            raise ValueError(f"groups must hold one group name per image ({B}), got {groups!r}")
        pos = {g: i for i, g in enumerate(self.groups)}
        unknown = [g for g in groups if g not in pos]
        if unknown:
            raise ValueError(f"groups holds names not in this metric's groups {self.groups}: {unknown[:5]}")
        return torch.tensor([pos[g] for g in groups], dtype=torch.int64)

    @torch.no_grad()
    def update(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        image_ids: Sequence[Any] | None = None,
        groups: Sequence[Hashable] | None = None,
        spacing: Any = None,
    ) -> None:
        """Add one batch: ``input`` (B, C, *spatial) probabilities (or logits with softmax/sigmoid) and
        ``target`` as in :func:`calibops.functional.binned_stats`. Spatial sizes may change between calls.

        ``image_ids`` (B names/numbers) label the per-image records and error messages; default: a running
        index. ``groups``: one group name per image (metrics built with ``groups=``). Everything is checked
        before the state changes: a batch that raises adds nothing. With ``classification=True``: ``input``
        (B, C) and ``target`` (B,) class indices or (B, C) one-hot; ``groups`` one name per sample. ``spacing``
        (``multi_rater`` records only): voxel size per spatial axis, or (B, D) per image, for ``volume_crps``.
        """
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if self.classification:
            self._update_classification(input, target, groups)
            return
        if input.dim() == 2 and input.shape[1] == self.num_classes:
            raise ValueError(
                f"input has shape (B, C) = {tuple(input.shape)} with no spatial axis: for classification predictions "
                "(one row per sample) build DatasetCalibration(..., classification=True); for B images of one voxel "
                "each pass input[..., None]"
            )
        if input.dim() < 2 or input.shape[1] != self.num_classes:
            raise ValueError(
                f"input must have shape (B, {self.num_classes}, *spatial) for "
                f"num_classes={self.num_classes}, got {tuple(input.shape)}"
            )
        B = input.shape[0]
        if image_ids is not None and len(image_ids) != B:
            raise ValueError(f"image_ids has {len(image_ids)} entries for a batch of {B} images")
        gidx = self._group_index(groups, B)
        input = input.detach()
        run = F._stats(input, target, self._opts, raise_nonfinite=False)
        if run.counts is not None:  # validated: the counts are on the host already (one synchronisation)
            nonfinite: int | torch.Tensor = run.counts[1]
            if nonfinite > 0:
                self._report_nonfinite(input, target, image_ids)
        else:  # not validated: count on the device, no synchronisation
            nonfinite = run.bad[1]
        stats = self._rows(run.stats)
        moments = self._moment_rows(run.stats) if self.brier_score else None
        rated = stats  # multi-rater: sum_y (B, C', R, M); the pooled sums use the rater-mean soft label
        if self.multi_rater:
            stats = BinnedStats(stats.count, stats.sum_p, stats.sum_y.mean(-2))
        fine = None
        if self.adaptive_bins is not None:  # the same entries over fine bins (values already checked)
            opts = self._opts._replace(num_bins=self.fine_bins, validate=False, moments=False)
            fine = self._rows(F._stats(input, target, opts, raise_nonfinite=False).stats)
            if self.multi_rater:
                fine = BinnedStats(fine.count, fine.sum_p, fine.sum_y.mean(-2))
        if stats.count.device != self._device:
            self.to(stats.count.device)
        if self.multi_rater:  # per rater, then the mean over raters (every rater shares the image's voxels)
            errs = calibration_errors_from_stats(F.per_rater_stats(rated)).map(lambda e: e.mean(1))
        else:
            errs = calibration_errors_from_stats(stats)  # (B, C') each, NaN where undefined, l2 included
        per_image = torch.stack([e.double() for e in errs])  # [3, B, C']
        defined = ~torch.isnan(per_image)
        zero = torch.zeros_like(per_image)
        macro_add = torch.where(defined, per_image, zero)  # [3, B, C']
        l2 = errs.l2.double()
        l2_add = torch.where(torch.isnan(l2), torch.zeros_like(l2), l2)  # defined exactly where the ECE is
        hist = reliability_histogram_counts(stats, self.right, per_image=gidx is not None)
        st = self._state
        st.add("macro_sum", macro_add.sum(1))
        st.add("macro_l2", l2_add.sum(0))
        st.add("macro_n", defined.sum(1))
        st.add("count", stats.count.double().sum(0))
        st.add("sum_p", stats.sum_p.double().sum(0))
        st.add("sum_y", stats.sum_y.double().sum(0))
        if moments is not None:
            brier = self._brier_per_image(rated, moments)
            st.add("brier_sum", torch.where(torch.isnan(brier), torch.zeros_like(brier), brier).sum(0))
            st.add("sum_p2", moments[0].double().sum(0))
            st.add("sum_py", moments[1].double().sum(0))
        st.add("hist", hist.sum(0) if gidx is not None else hist)
        st.add("images_with_class", (stats.sum_y.sum(-1) > 0).sum(0))
        st.add("num_nonfinite", torch.as_tensor(nonfinite))
        if fine is not None:
            for k in ("count", "sum_p", "sum_y"):
                st.add("fine_" + k, getattr(fine, k).double().sum(0))
        if gidx is not None:
            gi = gidx.to(self._device)
            for k in ("count", "sum_p", "sum_y"):
                st["group_" + k].index_add_(0, gi, getattr(stats, k).double())
            st["group_macro_sum"].index_add_(0, gi, macro_add.movedim(1, 0))
            st["group_macro_l2"].index_add_(0, gi, l2_add)
            st["group_macro_n"].index_add_(0, gi, defined[0].long())
            st["group_hist"].index_add_(0, gi, hist)
            st["group_images"].index_add_(0, gi, torch.ones(B, dtype=torch.int64, device=self._device))
        start = int(st["num_images"]) if self.keep_records else 0
        st.add("num_images", torch.tensor(B))
        if self.keep_records:
            extra = self._rater_records(input, target, rated, spacing) if self.multi_rater else {}
            self._add_records(input, target, stats, errs, start, image_ids, groups, extra)

    def _moment_rows(self, stats: BinnedStats) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_p2, sum_py) cut to the statistic rows like :meth:`_rows`."""
        if self.mode == "top_label":
            return stats.sum_p2.unsqueeze(1), stats.sum_py.unsqueeze(1)
        first = self.classes[0]
        return stats.sum_p2[:, first:], stats.sum_py[:, first:]

    @staticmethod
    def _brier_per_image(rated: BinnedStats, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Brier score per (image, row), float64, NaN without voxels; several raters: the mean over raters."""
        from .reference import BinnedStatsMoments

        return brier_decomposition(BinnedStatsMoments(*rated, *moments)).brier

    def _rows(self, stats: BinnedStats) -> BinnedStats:
        """(B, C', M) statistic rows: top-label (B, M) gets its one row, marginal drops the background here (not
        in binned_stats, so a one-channel input keeps its class silently)."""
        if self.mode == "top_label":
            return BinnedStats(*(t.unsqueeze(1) for t in stats))
        first = self.classes[0]
        return BinnedStats(stats.count[:, first:], stats.sum_p[:, first:], stats.sum_y[:, first:])

    def _rater_records(self, input: torch.Tensor, target: torch.Tensor, rated: BinnedStats, spacing: Any) -> dict:
        """Per-image multi-rater values for the records (marginal): volume CRPS from the statistics already
        computed (Σ p and the raters' label counts over the bins) and the consensus Dice."""
        if self.mode != "marginal":
            return {}
        from .evaluation import crps_gaussian

        B, D = input.shape[0], input.dim() - 2
        vox = F._voxel_volume(spacing, B, D, rated.count.device).view(B, 1)
        v = rated.sum_p.double().sum(-1) * vox  # (B, C')
        vols = rated.sum_y.double().sum(-1) * vox.unsqueeze(-1)  # (B, C', R)
        crps = crps_gaussian(v, vols.mean(-1), vols.var(-1, unbiased=False).sqrt())
        dice = F.consensus_dice(input, target, include_background=True, softmax=self.softmax, sigmoid=self.sigmoid)
        return {"volume_crps": crps, "consensus_dice": dice[:, self.classes[0] :]}

    def _update_classification(self, input: torch.Tensor, target: Any, groups: Sequence[Hashable] | None) -> None:
        if input.dim() != 2 or input.shape[1] != self.num_classes:
            raise ValueError(
                f"classification input must be (B, {self.num_classes}) (one row per sample), got {tuple(input.shape)}"
            )
        B = input.shape[0]
        gidx = self._group_index(groups, B)
        x, t, labels = F._classification_layout(input.detach(), target)
        if self.brier_score and not labels:
            raise ValueError("brier=True needs class indices (B,) as target (binary targets: y² = y)")
        opts = self._opts._replace(to_onehot_y=labels)
        parts = [(None, x, t)]
        if gidx is not None:  # one pooled population per group: the samples of each group present
            gdev = gidx.to(x.device)
            parts += [(int(g), x[:, :, gdev == g], t[..., gdev == g]) for g in gidx.unique().tolist()]
        found = []
        for g, xs, ts in parts:
            run = F._stats(
                xs, ts, opts if g is None else opts._replace(validate=False), raise_nonfinite=self.nonfinite == "raise"
            )
            if g is None and run.counts is not None and run.counts[1] > 0:  # nonfinite="skip": left out, counted
                warnings.warn(
                    f"DatasetCalibration: left out {run.counts[1]} non-finite probability value(s) of this batch of "
                    "samples (counted in compute().nonfinite)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            fine = None
            if self.adaptive_bins is not None and g is None:
                fopts = opts._replace(num_bins=self.fine_bins, validate=False, moments=False)
                fine = self._rows(F._stats(xs, ts, fopts).stats)
            moments = self._moment_rows(run.stats) if (self.brier_score and g is None) else None
            found.append((g, self._rows(run.stats), fine, run.bad[1], moments))
        dev = found[0][1].count.device
        if dev != self._device:
            self.to(dev)
        st = self._state
        for g, stats, fine, bad, moments in found:
            if g is None:
                for k in ("count", "sum_p", "sum_y"):
                    st.add(k, getattr(stats, k).double().sum(0))
                if moments is not None:
                    st.add("sum_p2", moments[0].double().sum(0))
                    st.add("sum_py", moments[1].double().sum(0))
                st.add("num_nonfinite", bad)
                if fine is not None:
                    for k in ("count", "sum_p", "sum_y"):
                        st.add("fine_" + k, getattr(fine, k).double().sum(0))
            else:
                for k in ("count", "sum_p", "sum_y"):
                    st["group_" + k][g] += getattr(stats, k).double().sum(0)
                st["group_images"][g] += int((gidx == g).sum())
        st.add("num_images", torch.tensor(B))

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

    def _add_records(self, input, target, stats, errs, start, image_ids, groups, extra_values=None) -> None:
        B = input.shape[0]
        ids = list(image_ids) if image_ids is not None else list(range(start, start + B))
        values = {"ece": errs.ece, "ace": errs.ace, "mce": errs.mce, "l2": errs.l2, **(extra_values or {})}
        if self.dice:
            values["dice"] = self._dice(input, target)
        extra = {"group": list(groups)} if groups is not None else None
        self._records.add(ids, self.classes or ("top_label",), values, stats.count.sum(-1), extra)

    def _dice(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return hard_dice(
            input, target, self.classes, self.to_onehot_y, self.ignore_index, softmax=self.softmax, sigmoid=self.sigmoid
        )

    # ---------------------------------------------------------------- results
    def _synced(self) -> dict[str, torch.Tensor]:
        """State summed over all ranks when distributed, in one all-reduce (the local state is left untouched)."""
        return self._state.synced(self.process_group)

    def compute(self) -> DatasetCalibrationResult:
        """Macro and micro ECE/ACE/MCE (and L2, the ``l2`` attribute) per class, (C',) float32 each.

        When ``torch.distributed`` is initialised this is a collective: call it on every rank.
        """
        return R.overall(self._synced(), self.mode, self.classes)

    def _need_groups(self) -> tuple[Hashable, ...]:
        if self.groups is None:
            raise RuntimeError("per-group results need DatasetCalibration(..., groups=(names...))")
        return self.groups

    def compute_groups(self) -> dict[Hashable, GroupResult]:
        """:class:`GroupResult` per group name (macro / micro errors of the group's images). A collective when
        distributed. Classification: micro only (macro NaN)."""
        return R.per_group(self._synced(), self._need_groups(), self.mode)

    def group_gaps(self, kind: str = "macro") -> dict[str, GroupGap]:
        """The largest between-group difference of every metric (``"ece"``, ``"ace"``, ``"mce"``, ``"l2"``), of the
        ``kind="macro"`` (mean over images) or ``"micro"`` (pooled) values. A collective when distributed."""
        if kind not in ("macro", "micro"):
            raise ValueError(f"kind must be 'macro' or 'micro', got {kind!r}")
        return R.group_gaps(self.compute_groups(), kind)

    def bootstrap(
        self,
        metric: str = "ece",
        *,
        num_samples: int = 1000,
        level: float = 0.95,
        seed: int = 0,
        gather: bool = True,
    ) -> dict[str, Any]:
        """Seeded percentile bootstrap intervals of the macro ``metric`` (mean over images) per class.

        Needs ``keep_records=True``. Images are resampled with replacement (within each group when the metric has
        groups: a stratified bootstrap). Returns ``{"all": ConfidenceInterval}`` and, with groups,
        ``{"groups": {name: ConfidenceInterval}, "gap": ConfidenceInterval}`` where the gap is the largest
        between-group difference recomputed on every resample. ``gather=True`` uses every rank's records (a
        collective). Same ``seed``, same intervals, on any machine.
        """
        if not self.keep_records:
            raise RuntimeError(
                "bootstrap resamples per-image records: build DatasetCalibration(..., keep_records=True)"
            )
        recs = self.records(gather=gather)
        classes = self.classes or ("top_label",)
        return R.bootstrap(recs, classes, self.groups, self.mode, metric, num_samples, level, seed)

    def brier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(macro, micro)`` Brier score per class, (C',) float64 (0-d top-label): the mean over images of the
        per-image scores (images without voxels skipped), and the score of the pooled voxels. Several raters: the
        mean over raters. Needs ``brier=True``; a collective when distributed."""
        if not self.brier_score:
            raise RuntimeError("the Brier score needs DatasetCalibration(..., brier=True)")
        return R.brier(self._synced(), self.mode)

    def brier_decomposition(self) -> BrierDecomposition:
        """Murphy decomposition of the pooled Brier score (:func:`calibops.evaluation.brier_decomposition`), each
        (C',) float64 (0-d top-label). Several raters: on the rater-mean soft label (its uncertainty term includes
        the raters' disagreement). Needs ``brier=True``; a collective when distributed."""
        if not self.brier_score:
            raise RuntimeError("the Brier decomposition needs DatasetCalibration(..., brier=True)")
        d = R.pooled_decomposition(self._synced())
        return BrierDecomposition(*(t[0] for t in d)) if self.mode == "top_label" else d

    def adaptive_errors(self) -> CalibrationErrors:
        """Pooled (micro) ECE / ACE / MCE / L2 over ``adaptive_bins`` equal-mass bins built from the fine pooled
        histogram (:func:`calibops.evaluation.adaptive_calibration_errors`). A collective when distributed."""
        if self.adaptive_bins is None:
            raise RuntimeError("adaptive errors need DatasetCalibration(..., adaptive_bins=M)")
        return R.adaptive(self._synced(), self.adaptive_bins, self.mode)

    def histogram(self) -> torch.Tensor:
        """The dataset reliability histogram ``H[c, a, j]``, int64 (C', M, M): class, accuracy bin (0 =
        lowest), confidence bin. A collective when distributed: call it on every rank."""
        if self.classification:
            raise RuntimeError(
                "classification pools the samples: there is no per-image histogram; plot() draws the reliability "
                "diagram of the pooled samples"
            )
        hist = self._synced()["hist"].clone()
        return hist[0] if self.mode == "top_label" else hist

    def pooled_counts(self) -> torch.Tensor:
        """Voxels per (class, confidence bin) over the data set, (C', M) float64 (summed over ranks)."""
        return self._synced()["count"].clone()

    def pooled_stats(self) -> BinnedStats:
        """The pooled statistics ``(count, sum_p, sum_y)``, (C', M) float64 each (summed over ranks)."""
        s = self._synced()
        return BinnedStats(s["count"].clone(), s["sum_p"].clone(), s["sum_y"].clone())

    def records(self, gather: bool = False) -> list[dict[str, Any]]:
        """Per-(image, class) records (``keep_records=True``): image, class, ece, ace, mce, l2, voxels[, dice]
        [, group].

        ``gather=True`` collects every rank's records (a collective) and adds each record's ``rank``.
        """
        if not self.keep_records:
            raise RuntimeError("records are kept only with DatasetCalibration(..., keep_records=True)")
        return self._records.get(gather, self.process_group)

    def write_records_csv(self, path: str | os.PathLike, gather: bool = False) -> None:
        """Write :meth:`records` to a CSV file (one row per image and class; columns image, class, ece, ace,
        mce, voxels[, dice], l2[, group])."""
        recs = self.records(gather=gather)
        fields = ["image", "class", *_METRICS, "voxels"] + (["dice"] if self.dice else []) + ["l2"]
        fields += ["group"] if self.groups is not None else []
        fields += ["volume_crps", "consensus_dice"] if (self.multi_rater and self.mode == "marginal") else []
        ImageRecords.write_csv(path, recs, fields)

    def group_rows(self) -> list[dict[str, Any]]:
        """One row per (group, class) — group, class, images, macro_* and micro_* of ECE / ACE / MCE / L2 — then one
        ``group="gap"`` row per class with the largest between-group differences (:meth:`group_gaps`). For CSV / JSON
        reports (:meth:`write_groups_csv`). A collective when distributed."""
        return R.group_rows(self.compute_groups(), self.classes or ("top_label",))

    def write_groups_csv(self, path: str | os.PathLike) -> None:
        """Write :meth:`group_rows` to a CSV file. A collective when distributed."""
        rows = self.group_rows()
        fields = ["group", "class", "images"] + [f"{k}_{m}" for k in ("macro", "micro") for m in R.METRICS]
        ImageRecords.write_csv(path, rows, fields)

    def plot_groups(self, class_index: int = 0, *, title: str | None = None) -> Figure:
        """The groups' pooled reliability diagrams side by side (one panel per group) for one used class
        (``class_index`` into :attr:`classes`; ignored for top-label). A collective when distributed."""
        from ._report import reliability_panels

        names = self._need_groups()
        s = self._synced()
        k = 0 if self.mode == "top_label" else class_index
        if not 0 <= k < self.num_used_classes:
            raise ValueError(f"class_index must lie in [0, {self.num_used_classes}), got {class_index}")
        stats = [
            BinnedStats(s["group_count"][g, k], s["group_sum_p"][g, k], s["group_sum_y"][g, k])
            for g in range(len(names))
        ]
        what = "top-label" if self.mode == "top_label" else f"class {self.classes[k]}"
        return reliability_panels(stats, [str(n) for n in names], suptitle=title or what)

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
        (C'), or per input class (C, the background name is then dropped). A collective when distributed.
        Classification: the reliability diagram of the pooled samples, one panel per class (or one, top-label)."""
        from .plot import dataset_reliability_histogram

        s = self._synced()
        if self.classification:
            return self._plot_pooled(s, class_names)
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

    def _plot_pooled(self, s: dict[str, torch.Tensor], class_names: Sequence[str] | None) -> Figure:
        from ._report import reliability_panels

        if self.mode == "top_label":
            titles = ["top-label"]
        elif class_names is not None:
            names = [str(n) for n in class_names]
            titles = [names[c] for c in self.classes] if len(names) == self.num_classes else names
        else:
            titles = [f"class {c}" for c in self.classes]
        if len(titles) != self.num_used_classes:
            raise ValueError(f"class_names: need one name per class, got {class_names}")
        stats = [BinnedStats(s["count"][k], s["sum_p"][k], s["sum_y"][k]) for k in range(self.num_used_classes)]
        return reliability_panels(stats, titles, suptitle="pooled samples")

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"DatasetCalibration({cfg}, nonfinite={self.nonfinite!r}, images={int(self._state['num_images'])})"
