"""The configuration of a dataset accumulator: every option checked once, and what follows from them.

:class:`MetricConfig` is built (and checked) once, when :class:`calibops.DatasetCalibration` or an adapter is
constructed; everything downstream (the batch contribution, the state, checkpoints) reads it and never checks an
option again. It holds one :class:`calibops.options.Options` for the statistics options shared with the rest of
calibops, the options only a dataset metric has, and derives from them the statistic rows (``classes``), the
options of the statistics calls and the state layout (:meth:`MetricConfig.spec`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..options import Options, as_bool, as_int

__all__ = [
    "HISTOGRAM_MEMORY_ENV",
    "HISTOGRAM_MEMORY_LIMIT",
    "NONFINITE",
    "OPTIONS",
    "MetricConfig",
    "StateSpec",
    "histogram_bytes",
    "histogram_memory_error",
    "histogram_memory_limit",
]

HISTOGRAM_MEMORY_LIMIT = 2**30
"""Default bound, in bytes, on the dataset reliability histograms of one accumulator: int64 (C', M, M) overall and
(G, C', M, M) per group, allocated when it is built. Override it with ``DatasetCalibration(...,
histogram_memory_limit=bytes)`` or the environment variable :data:`HISTOGRAM_MEMORY_ENV`."""
HISTOGRAM_MEMORY_ENV = "CALIBOPS_HISTOGRAM_MEMORY_LIMIT"


def histogram_memory_limit(limit: Any = None) -> int:
    """The bound in bytes: ``limit`` if given, else the environment variable :data:`HISTOGRAM_MEMORY_ENV`, else
    :data:`HISTOGRAM_MEMORY_LIMIT` (1 GiB)."""
    name = "histogram_memory_limit"
    if limit is None:
        env = os.environ.get(HISTOGRAM_MEMORY_ENV)
        if env is None or env.strip() == "":
            return HISTOGRAM_MEMORY_LIMIT
        name = f"the environment variable {HISTOGRAM_MEMORY_ENV}"
        try:
            limit = int(env.strip())
        except ValueError:
            raise ValueError(f"{name} must be a whole number of bytes, got {env!r}") from None
    if isinstance(limit, bool) or not isinstance(limit, int):
        try:
            limit = as_int(name, limit)
        except TypeError as exc:
            raise TypeError(f"{exc}; {name} is a number of bytes") from None
    if limit < 1:
        raise ValueError(f"{name} must be >= 1 byte, got {limit}")
    return int(limit)


_limit_of = histogram_memory_limit  # the function, where a parameter of the same name hides it


def histogram_bytes(num_bins: int, classes: int, groups: int = 0) -> int:
    """Bytes of the int64 reliability histograms of ``classes`` rows, overall and per group: (1 + G) C' M² · 8."""
    return (1 + groups) * classes * num_bins * num_bins * 8


def histogram_memory_error(
    num_bins: int, classes: int, groups: int = 0, limit: Any = None, *, argument: str = "num_bins"
) -> str | None:
    """None when the histograms fit :func:`histogram_memory_limit`, else the message that refuses ``num_bins``
    (named ``argument``: the CLI says ``--num-bins``) with the memory it would need and the largest that fits."""
    bound = histogram_memory_limit(limit)
    need = histogram_bytes(num_bins, classes, groups)
    if need <= bound:
        return None
    fits = math.isqrt(bound // (8 * (1 + groups) * max(classes, 1)))
    per = f"{classes} class(es)" + (f" and {groups} group(s)" if groups else "")
    sep = " " if argument.startswith("-") else "="  # a command-line flag, or a keyword argument
    return (
        f"{argument}{sep}{num_bins}: the dataset reliability histogram (class x {num_bins} x {num_bins} int64 counts, "
        f"per group too) would need {need / 2**30:.2f} GiB for {per}, over the limit of {bound / 2**30:.2f} GiB "
        f"(histogram_memory_limit= or the environment variable {HISTOGRAM_MEMORY_ENV}, in bytes); use "
        f"{argument}{sep}{fits} or fewer (10-100 bins are usual)"
    )


NONFINITE = ("raise", "skip")
#: the :class:`calibops.options.Options` fields a dataset metric takes (hard bins, no loss options)
OPTIONS = (
    "num_bins",
    "include_background",
    "to_onehot_y",
    "softmax",
    "sigmoid",
    "ignore_index",
    "right",
    "backend",
    "validate",
    "mode",
    "multi_rater",
)

#: name -> (shape, dtype) of every state entry
StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class MetricConfig:
    """Checked options of a dataset metric (see :class:`calibops.DatasetCalibration` for their meaning).

    Build it with :meth:`build` (which checks every option); the fields are then plain, normalised values.
    """

    num_classes: int
    options: Options
    nonfinite: str = "raise"
    keep_records: bool = False
    dice: bool = False
    classification: bool = False
    groups: tuple[Hashable, ...] | None = None
    adaptive_bins: int | None = None
    fine_bins: int | None = None
    brier: bool = False
    histogram_memory_limit: int | None = None

    @classmethod
    def build(
        cls,
        num_classes: Any,
        *,
        nonfinite: Any = "raise",
        keep_records: Any = False,
        dice: Any = False,
        classification: Any = False,
        groups: Sequence[Hashable] | None = None,
        adaptive_bins: Any = None,
        fine_bins: Any = 1000,
        brier: Any = False,
        histogram_memory_limit: Any = None,
        **options: Any,
    ) -> MetricConfig:
        """Check every option (a ``TypeError`` / ``ValueError`` naming it) and return the configuration.

        ``options``: the statistics options a dataset metric shares with the rest of calibops (:data:`OPTIONS`),
        checked by :class:`calibops.options.Options`; the others are the dataset metric's own."""
        try:
            num_classes = as_int("num_classes", num_classes)
        except TypeError as exc:
            raise TypeError(f"{exc}; num_classes must be an int >= 1") from None
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; a dataset metric takes {sorted(OPTIONS)} and its own")
        o = Options(**options)
        keep_records = as_bool("keep_records", keep_records)
        dice = as_bool("dice", dice)
        classification = as_bool("classification", classification)
        brier = as_bool("brier", brier)
        if not isinstance(nonfinite, str):
            raise TypeError(f"nonfinite must be one of {NONFINITE}, got {type(nonfinite).__name__}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
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
            Options(num_bins=fine_bins)  # the same cap as num_bins
        else:
            fine_bins = None
        if brier and not (o.to_onehot_y or classification):
            raise ValueError("brier=True needs integer labels (to_onehot_y=True), whose squares are themselves")
        if o.multi_rater and dice:
            raise ValueError(
                "dice=True compares with one label map: with multi_rater=True the records carry consensus_dice"
            )
        if o.multi_rater and classification:
            raise ValueError("multi_rater=True reads rater label maps of images: not with classification=True")
        if histogram_memory_limit is not None:
            histogram_memory_limit = _limit_of(histogram_memory_limit)
        cfg = cls(
            num_classes,
            o,
            nonfinite,
            keep_records,
            dice,
            classification,
            groups,
            adaptive_bins,
            fine_bins,
            brier,
            histogram_memory_limit,
        )
        cfg.check_memory()
        return cfg

    def check_memory(self) -> None:
        """Refuse (``ValueError`` naming ``num_bins`` and the memory) histograms over the bound
        (:func:`histogram_memory_limit`), before anything is allocated."""
        groups = len(self.groups) if self.groups is not None else 0
        msg = histogram_memory_error(self.options.num_bins, self.num_used_classes, groups, self.histogram_memory_limit)
        if msg is not None:
            raise ValueError(msg)

    def replace(self, **changes: Any) -> MetricConfig:
        """A copy with ``changes`` applied to the fields (not re-checked: for adapters that adjust a checked one)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- derived
    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def multi_rater(self) -> bool:
        return self.options.multi_rater

    @cached_property
    def classes(self) -> tuple[int, ...]:
        """The class index of each statistic row (marginal), or () for top-label (one row, no class axis)."""
        if self.mode != "marginal":
            return ()
        first = 0 if (self.options.include_background or self.num_classes == 1) else 1
        return tuple(range(first, self.num_classes))

    @property
    def num_used_classes(self) -> int:
        """C': the number of statistic rows (classes kept, marginal), or 1 (top-label)."""
        return len(self.classes) if self.mode == "marginal" else 1

    @property
    def row_names(self) -> tuple[Any, ...]:
        """The ``class`` of each statistic row in records: the class indices, or ``("top_label",)``."""
        return self.classes or ("top_label",)

    @cached_property
    def stats_options(self) -> Options:
        """Options of the statistics call: hard bins; the background is kept there and dropped per row, so a
        one-channel input keeps its class; moments with ``brier``."""
        return self.options.replace(include_background=True, binning="hard", moments=self.brier)

    @cached_property
    def fine_options(self) -> Options | None:
        """Options of the fine-bin statistics call behind ``adaptive_bins`` (values already checked by the first)."""
        if self.adaptive_bins is None:
            return None
        return self.stats_options.replace(num_bins=self.fine_bins, validate=False, moments=False)

    @property
    def nan_ok(self) -> tuple[str, ...]:
        """State entries that may be NaN: unknown since a checkpoint written before they existed was loaded."""
        return ("macro_l2", "group_macro_l2")

    def spec(self) -> StateSpec:
        """Name -> (shape, dtype) of every state entry; the total size is O(C'·M²) (groups: G times that)."""
        Cp, M = self.num_used_classes, self.options.num_bins
        f64, i64 = torch.float64, torch.int64
        spec: StateSpec = {
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
        if self.brier:
            spec.update({"sum_p2": ((Cp, M), f64), "sum_py": ((Cp, M), f64), "brier_sum": ((Cp,), f64)})
        return spec

    def as_dict(self) -> dict[str, Any]:
        """The configuration a checkpoint records (and must match on loading)."""
        o = self.options
        cfg: dict[str, Any] = {
            "num_classes": self.num_classes,
            "num_bins": o.num_bins,
            "include_background": o.include_background,
            "to_onehot_y": o.to_onehot_y,
            "softmax": o.softmax,
            "sigmoid": o.sigmoid,
            "ignore_index": o.ignore_index,
            "right": o.right,
            "mode": o.mode,
        }
        # options added later appear only when used, so older checkpoints keep matching
        if self.classification:
            cfg["classification"] = True
        if self.multi_rater:
            cfg["multi_rater"] = True
        if self.brier:
            cfg["brier"] = True
        if self.groups is not None:
            cfg["groups"] = list(self.groups)
        if self.adaptive_bins is not None:
            cfg["adaptive_bins"] = self.adaptive_bins
            cfg["fine_bins"] = self.fine_bins
        return cfg

    def record_fields(self) -> list[str]:
        """The CSV columns of the per-image records."""
        fields = ["image", "class", "ece", "ace", "mce", "voxels"] + (["dice"] if self.dice else []) + ["l2"]
        fields += ["group"] if self.groups is not None else []
        fields += ["volume_crps", "consensus_dice"] if (self.multi_rater and self.mode == "marginal") else []
        return fields
