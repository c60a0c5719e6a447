"""The metric formulas of :class:`calibops.DatasetCalibration` on its summed state (one job of the split).

Every function takes the state dict summed over ranks (``SumState.synced()``: name -> tensor) or the per-image
records, and the few configuration values it needs (``mode``, ``classes``, group names); none runs a statistics
kernel or a collective. The per-bin formulas themselves come from :mod:`calibops.reference` and
:mod:`calibops.evaluation`; this module only applies them to the dataset's sums: macro means, pooled (micro)
errors, per-group results and gaps, bootstrap intervals, Brier scores, adaptive bins.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch

from ..evaluation import (
    BrierDecomposition,
    ConfidenceInterval,
    adaptive_calibration_errors,
    bootstrap_ci,
    bootstrap_means,
    brier_decomposition,
    check_bootstrap_args,
)
from ..options import METRICS
from ..results import BinnedStats, BinnedStatsMoments, CalibrationErrors, calibration_errors_from_stats
from .records import ImageRecords

__all__ = ["DatasetCalibrationResult", "GroupGap", "GroupResult"]

State = dict[str, torch.Tensor]


class DatasetCalibrationResult(NamedTuple):
    """Dataset calibration errors, each field a ``CalibrationErrors(ece, ace, mce)`` of (C',) float32 (with the
    L2 error as its ``l2`` attribute).

    ``macro``: mean over images of the per-image values (images where a value is NaN are skipped; NaN if no
    image has it; always NaN for classification, where a sample is not a population). ``micro``: the same
    formulas on the statistics summed over all images (pooled sums). ``num_images``: images (samples, for
    classification) seen, over all ranks when distributed. ``classes``: the class index of each of the C' entries.
    ``images_per_class``: (C',) int64, the number of images each class's macro ECE/ACE/MCE average over: images
    with at least one voxel in the statistics (not ignored, finite probability). That is every such image for
    every class, *whether or not the class appears in its target*: calibration is defined for a class's
    probabilities wherever there are voxels. ``images_with_class``: (C',) int64, images whose target holds the
    class (at least one voxel of it in the statistics: Σ y > 0). ``nonfinite``: probability entries left out
    because they were NaN or infinite (0 unless ``nonfinite="skip"`` or ``validate=False``).
    """

    macro: CalibrationErrors
    micro: CalibrationErrors
    num_images: int
    classes: tuple[int, ...]
    images_per_class: torch.Tensor
    images_with_class: torch.Tensor
    nonfinite: int


class GroupResult(NamedTuple):
    """One subgroup's errors: ``macro`` / ``micro`` as in :class:`DatasetCalibrationResult`, its number of
    images, and per class the images its macro values average over."""

    macro: CalibrationErrors
    micro: CalibrationErrors
    num_images: int
    images_per_class: torch.Tensor


class GroupGap(NamedTuple):
    """The largest between-group difference of one metric, per class (C',) (0-d for top-label): ``gap`` =
    highest - lowest group value (groups where the value is NaN are skipped; NaN with fewer than two), and the
    names of the ``highest`` and ``lowest`` group per class."""

    gap: torch.Tensor
    highest: list[Any]
    lowest: list[Any]


def _macro(sums: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Mean over images from a sum and a count (NaN where no image)."""
    return torch.where(n > 0, sums / n.clamp(min=1), torch.full_like(sums, float("nan")))


def _errors(macro: torch.Tensor, l2: torch.Tensor) -> CalibrationErrors:
    return CalibrationErrors(*(m.float() for m in macro), l2.float())


def _squeeze(errs: CalibrationErrors, mode: str) -> CalibrationErrors:
    """Top-label results drop their one-row axis."""
    return errs.map(lambda m: m[..., 0]) if mode == "top_label" else errs


def _micro(count: torch.Tensor, sum_p: torch.Tensor, sum_y: torch.Tensor) -> CalibrationErrors:
    return calibration_errors_from_stats(BinnedStats(count, sum_p, sum_y)).map(lambda m: m.float())


def overall(s: State, mode: str, classes: tuple[int, ...]) -> DatasetCalibrationResult:
    """Macro and micro errors of the whole data set."""
    macro = _errors(_macro(s["macro_sum"], s["macro_n"]), _macro(s["macro_l2"], s["macro_n"][0]))
    micro = _micro(s["count"], s["sum_p"], s["sum_y"])
    per_class = (s["macro_n"][0].clone(), s["images_with_class"].clone())
    if mode == "top_label":
        per_class = tuple(t[0] for t in per_class)
    return DatasetCalibrationResult(
        _squeeze(macro, mode), _squeeze(micro, mode), int(s["num_images"]), classes, *per_class, int(s["num_nonfinite"])
    )


def per_group(s: State, names: Sequence[Hashable], mode: str) -> dict[Hashable, GroupResult]:
    """:class:`GroupResult` per group name, from the ``group_*`` sums."""
    out: dict[Hashable, GroupResult] = {}
    for g, name in enumerate(names):
        n = s["group_macro_n"][g]
        sums = _macro(s["group_macro_sum"][g], n.unsqueeze(0).expand(3, -1))
        macro = _errors(sums, _macro(s["group_macro_l2"][g], n))
        micro = _micro(s["group_count"][g], s["group_sum_p"][g], s["group_sum_y"][g])
        per_class = n.clone() if mode == "marginal" else n[0].clone()
        out[name] = GroupResult(_squeeze(macro, mode), _squeeze(micro, mode), int(s["group_images"][g]), per_class)
    return out


def gap(vals: torch.Tensor, names: Sequence[Hashable]) -> GroupGap:
    """Highest - lowest over the group axis 0 of ``vals`` (NaN skipped; NaN with fewer than two groups)."""
    ok = ~torch.isnan(vals)
    hi, hi_i = torch.where(ok, vals, torch.full_like(vals, -float("inf"))).max(0)
    lo, lo_i = torch.where(ok, vals, torch.full_like(vals, float("inf"))).min(0)
    enough = ok.sum(0) >= 2
    diff = torch.where(enough, hi - lo, torch.full_like(hi, float("nan")))
    flags = enough.reshape(-1).tolist()
    hi_names = [names[i] if e else None for i, e in zip(hi_i.reshape(-1).tolist(), flags, strict=True)]
    lo_names = [names[i] if e else None for i, e in zip(lo_i.reshape(-1).tolist(), flags, strict=True)]
    return GroupGap(diff, hi_names, lo_names)


def group_gaps(res: dict[Hashable, GroupResult], kind: str) -> dict[str, GroupGap]:
    """The largest between-group difference of every metric of the ``kind`` ("macro" / "micro") values."""
    if kind not in ("macro", "micro"):
        raise ValueError(f"kind must be 'macro' or 'micro', got {kind!r}")
    names = list(res)
    return {
        metric: gap(torch.stack([getattr(getattr(r, kind), metric).double() for r in res.values()]), names)
        for metric in METRICS
    }


def group_rows(res: dict[Hashable, GroupResult], classes: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per (group, class) with macro_* / micro_* of every metric, then one ``group="gap"`` row per class."""
    gaps = {kind: group_gaps(res, kind) for kind in ("macro", "micro")}
    rows: list[dict[str, Any]] = []
    for name, r in res.items():
        for k, c in enumerate(classes):
            row: dict[str, Any] = {"group": name, "class": c, "images": r.num_images}
            for kind in ("macro", "micro"):
                for metric in METRICS:
                    row[f"{kind}_{metric}"] = float(getattr(getattr(r, kind), metric).reshape(-1)[k])
            rows.append(row)
    for k, c in enumerate(classes):
        row = {"group": "gap", "class": c, "images": sum(r.num_images for r in res.values())}
        for kind in ("macro", "micro"):
            for metric in METRICS:
                row[f"{kind}_{metric}"] = float(gaps[kind][metric].gap.reshape(-1)[k])
        rows.append(row)
    return rows


def bootstrap(
    recs: list[dict[str, Any]],
    classes: Sequence[Any],
    names: Sequence[Hashable] | None,
    mode: str,
    metric: str,
    num_samples: int,
    level: float,
    seed: int,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of the macro ``metric`` from per-image records (see
    :meth:`calibops.DatasetCalibration.bootstrap`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    num_samples, level, seed = check_bootstrap_args(num_samples, level, seed)
    _, values, groups = ImageRecords.table(recs, classes, metric)
    if values.shape[0] == 0:
        raise ValueError("bootstrap needs at least one image")

    def squeeze(t: torch.Tensor) -> torch.Tensor:
        return t[..., 0] if mode == "top_label" else t

    out: dict[str, Any] = {
        "all": ConfidenceInterval(*map(squeeze, bootstrap_ci(values, num_samples=num_samples, level=level, seed=seed)))
    }
    if names is None:
        return out
    members = [torch.tensor([i for i, g in enumerate(groups) if g == name], dtype=torch.int64) for name in names]
    present = [k for k, m in enumerate(members) if m.numel() > 0]
    out["groups"] = {
        names[k]: ConfidenceInterval(
            *map(squeeze, bootstrap_ci(values[members[k]], num_samples=num_samples, level=level, seed=seed + 1 + k))
        )
        for k in present
    }
    # the gap: resample within every group (stratified; per group in order, one (num_samples, n_g) draw of image
    # positions from one generator seeded with `seed`), recompute each group's mean, take max - min
    gen = torch.Generator().manual_seed(int(seed))
    means = []
    for k in present:
        m = members[k]
        means.append(bootstrap_means(values[m], num_samples, gen))  # bounded chunks, the same draws
    present_names = [names[k] for k in present]
    draws = gap(torch.stack(means), present_names).gap  # (num_samples, C')
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.nanquantile(draws, q, dim=0)
    est = gap(torch.stack([values[members[k]].nanmean(0) for k in present]), present_names)
    out["gap"] = ConfidenceInterval(squeeze(est.gap), squeeze(lo), squeeze(hi))
    return out


def pooled_decomposition(s: State) -> BrierDecomposition:
    """Brier decomposition of the pooled statistics with moments."""
    return brier_decomposition(BinnedStatsMoments(s["count"], s["sum_p"], s["sum_y"], s["sum_p2"], s["sum_py"]))


def brier(s: State, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(macro, micro) Brier score."""
    macro = _macro(s["brier_sum"], s["macro_n"][0])
    micro = pooled_decomposition(s).brier
    return (macro[0], micro[0]) if mode == "top_label" else (macro, micro)


def adaptive(s: State, num_bins: int, mode: str) -> CalibrationErrors:
    """Pooled errors over ``num_bins`` equal-mass bins from the ``fine_*`` sums."""
    errs, _ = adaptive_calibration_errors(BinnedStats(s["fine_count"], s["fine_sum_p"], s["fine_sum_y"]), num_bins)
    return _squeeze(errs.map(lambda m: m.float()), mode)
