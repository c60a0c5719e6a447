"""One batch's complete contribution to a dataset accumulator, computed without touching any state.

:func:`contribution` is a pure function of the configuration and the batch: it runs every check and every
statistics call, and returns a :class:`Contribution` holding the delta of every state entry (the full shapes of
:meth:`MetricConfig.spec`, zeros where the batch adds nothing) and the batch's new per-image records. Anything
that can fail (shapes, labels, non-finite values, groups, spacing, Dice, ...) fails here, before anything is
committed; committing (``SumState.commit`` and appending the records) cannot fail halfway. So an ``update`` that
raises leaves the state bit-identical, in :class:`calibops.DatasetCalibration` and in the MONAI and torchmetrics
adapters alike (a list of items: every item's contribution first, then one commit of all).

Segmentation (``(B, C, *spatial)``, one value per image) and classification (``(B, C)``, the samples pooled)
batches both go through :func:`contribution`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch

from .. import engine
from .. import functional as F
from ..evaluation import brier_decomposition, crps_gaussian
from ..reference import ACT_NONE, ACT_SIGMOID, ACT_SOFTMAX, bin_edges
from ..results import BinnedStats, BinnedStatsMoments, CalibrationErrors, calibration_errors_from_stats
from .config import MetricConfig
from .records import hard_dice, make_records

__all__ = ["Contribution", "contribution", "merge_sums", "reliability_histogram_counts"]


class Contribution(NamedTuple):
    """What one batch adds: commit it with ``state.commit(c.sums)`` and ``records.extend(c.records)``.

    ``sums``: the delta of every state entry (name -> tensor of the entry's shape, on ``device``). ``records``:
    the new per-(image, row) records (empty without ``keep_records``). ``errors``: the per-image errors
    (B, C') each (segmentation; None for classification), e.g. for MONAI's per-image buffer. ``warning``: a
    message to emit once committed (non-finite values left out with ``nonfinite="skip"``), or None.
    """

    sums: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    errors: CalibrationErrors | None
    num_images: int
    warning: str | None
    device: torch.device


def merge_sums(parts: Sequence[Contribution]) -> tuple[dict[str, torch.Tensor], torch.device]:
    """The summed deltas of several contributions (e.g. the items of one list call), on the first one's device,
    so that they are committed in one step; and that device."""
    device = parts[0].device
    if len(parts) == 1:
        return parts[0].sums, device
    sums = {k: v.clone() for k, v in parts[0].sums.items()}
    for part in parts[1:]:
        if part.sums.keys() != sums.keys() or any(v.shape != sums[k].shape for k, v in part.sums.items()):
            raise ValueError("contributions of different configurations cannot be committed together")
        for k, v in part.sums.items():
            sums[k] += v.to(device)
    return sums, device


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


# ------------------------------------------------------------------------------------------ helpers
def group_index(cfg: MetricConfig, groups: Sequence[Hashable] | None, B: int) -> torch.Tensor | None:
    """The group position of each of the B images (int64, CPU), or None for a metric without groups."""
    if cfg.groups is None:
        if groups is not None:
            raise ValueError("groups= given to update, but this metric was built without groups=(names...)")
        return None
    if groups is None:
        raise ValueError(f"this metric reports per group: pass update(..., groups=[...]) with one of {cfg.groups}")
    if isinstance(groups, (str, bytes)) or len(groups) != B:
        raise ValueError(f"groups must hold one group name per image ({B}), got {groups!r}")
    pos = {g: i for i, g in enumerate(cfg.groups)}
    unknown = [g for g in groups if g not in pos]
    if unknown:
        raise ValueError(f"groups holds names not in this metric's groups {cfg.groups}: {unknown[:5]}")
    return torch.tensor([pos[g] for g in groups], dtype=torch.int64)


def _rows(cfg: MetricConfig, stats: BinnedStats) -> BinnedStats:
    """(B, C', M) statistic rows: top-label (B, M) gets its one row, marginal drops the background here (not in
    the statistics call, so a one-channel input keeps its class)."""
    if cfg.mode == "top_label":
        return BinnedStats(*(t.unsqueeze(1) for t in stats))
    first = cfg.classes[0]
    return BinnedStats(stats.count[:, first:], stats.sum_p[:, first:], stats.sum_y[:, first:])


def _moment_rows(cfg: MetricConfig, stats: BinnedStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_p2, sum_py) cut to the statistic rows like :func:`_rows`."""
    if cfg.mode == "top_label":
        return stats.sum_p2.unsqueeze(1), stats.sum_py.unsqueeze(1)
    first = cfg.classes[0]
    return stats.sum_p2[:, first:], stats.sum_py[:, first:]


def _rater_mean(stats: BinnedStats) -> BinnedStats:
    return BinnedStats(stats.count, stats.sum_p, stats.sum_y.mean(-2))


def _pooled(prefix: str, stats: BinnedStats) -> dict[str, torch.Tensor]:
    """``{prefix + "count": Σ_b count, ...}`` in float64."""
    return {prefix + k: getattr(stats, k).double().sum(0) for k in ("count", "sum_p", "sum_y")}


def _complete(cfg: MetricConfig, d: dict[str, torch.Tensor], device: torch.device, prefix: str = "") -> None:
    """Zeros (the batch adds nothing there) for every state entry named ``prefix...`` that ``d`` lacks."""
    for k, (shape, dt) in cfg.spec().items():
        if k not in d and k.startswith(prefix):
            d[k] = torch.zeros(shape, dtype=dt, device=device)


def _activation_name(cfg: MetricConfig) -> str:
    o = cfg.options
    act = ACT_SOFTMAX if o.softmax else ACT_SIGMOID if o.sigmoid else ACT_NONE
    return {ACT_SOFTMAX: "softmax", ACT_SIGMOID: "sigmoid", ACT_NONE: "no activation"}[act]


def _nonfinite_images(
    cfg: MetricConfig, input: torch.Tensor, target: torch.Tensor, image_ids: Sequence[Any] | None, seen: int
) -> str:
    """Slow path, taken only when a batch holds non-finite probabilities: find the images (one statistics call
    per image, same backend and rule), raise (``nonfinite="raise"``) or return the warning (``"skip"``)."""
    opts = cfg.stats_options.replace(validate=False, moments=False)
    per_image = [int(engine.run(input[b : b + 1], target[b : b + 1], opts).bad[1]) for b in range(input.shape[0])]
    found = [(image_ids[b] if image_ids is not None else seen + b, b, n) for b, n in enumerate(per_image) if n > 0]
    where = ", ".join(f"image {ident!r} (batch position {b}): {n}" for ident, b, n in found[:5])
    where += f", ... ({len(found) - 5} more images)" if len(found) > 5 else ""
    total, act = sum(per_image), _activation_name(cfg)
    if cfg.nonfinite == "raise":
        raise ValueError(
            f"input holds {total} non-finite probability value(s) after {act} (NaN or infinite logits): {where}. "
            f"Nothing of this batch was added (the {seen} images before it are kept). Fix the predictions, or "
            "pass nonfinite='skip' to leave such values out of the statistics and count them"
        )
    return (
        f"DatasetCalibration: left out {total} non-finite probability value(s) after {act}: {where} "
        "(counted in compute().nonfinite)"
    )


# ------------------------------------------------------------------------------------------ segmentation
@torch.no_grad()
def contribution(
    cfg: MetricConfig,
    input: torch.Tensor,
    target: torch.Tensor,
    image_ids: Sequence[Any] | None = None,
    groups: Sequence[Hashable] | None = None,
    spacing: Any = None,
    *,
    seen: int | torch.Tensor = 0,
) -> Contribution:
    """The complete contribution of one batch (every state delta and the new records); changes nothing.

    ``seen``: the number of images accumulated before this batch (an int or a 0-d tensor, read only when needed:
    the running index of records without ``image_ids`` and the non-finite error message). Arguments as in
    :meth:`calibops.DatasetCalibration.update`. Raises on anything wrong with the batch.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    cfg.check_memory()  # adapters learn C at the first batch: refuse its histograms before allocating them
    if cfg.classification:
        return _classification(cfg, input, target, groups)
    C = cfg.num_classes
    if input.dim() == 2 and input.shape[1] == C:
        raise ValueError(
            f"input has shape (B, C) = {tuple(input.shape)} with no spatial axis: for classification predictions "
            "(one row per sample) build DatasetCalibration(..., classification=True); for B images of one voxel "
            "each pass input[..., None]"
        )
    if input.dim() < 2 or input.shape[1] != C:
        raise ValueError(f"input must have shape (B, {C}, *spatial) for num_classes={C}, got {tuple(input.shape)}")
    B = input.shape[0]
    if image_ids is not None and len(image_ids) != B:
        raise ValueError(f"image_ids has {len(image_ids)} entries for a batch of {B} images")
    gidx = group_index(cfg, groups, B)
    input = input.detach()
    run = engine.run(input, target, cfg.stats_options, raise_nonfinite=False)
    warning = None
    if run.counts is not None:  # validated: the counts are on the host already (one synchronisation)
        nonfinite: int | torch.Tensor = run.counts[1]
        if nonfinite > 0:
            warning = _nonfinite_images(cfg, input, target, image_ids, int(seen))
    else:  # not validated: count on the device, no synchronisation
        nonfinite = run.bad[1]
    rated = _rows(cfg, run.stats)  # multi-rater: sum_y (B, C', R, M); the pooled sums use the rater-mean label
    stats = _rater_mean(rated) if cfg.multi_rater else rated
    dev = stats.count.device
    d: dict[str, torch.Tensor] = {}
    if cfg.fine_options is not None:  # the same entries over fine bins
        fine = _rows(cfg, engine.run(input, target, cfg.fine_options, raise_nonfinite=False).stats)
        d.update(_pooled("fine_", _rater_mean(fine) if cfg.multi_rater else fine))
    if cfg.multi_rater:  # per rater, then the mean over raters (every rater shares the image's voxels)
        errs = calibration_errors_from_stats(engine.per_rater_stats(rated)).map(lambda e: e.mean(1))
    else:
        errs = calibration_errors_from_stats(stats)  # (B, C') each, NaN where undefined, l2 included
    per_image = torch.stack([e.double() for e in errs])  # [3, B, C']
    defined = ~torch.isnan(per_image)
    macro_add = torch.where(defined, per_image, torch.zeros_like(per_image))  # [3, B, C']
    l2 = errs.l2.double()
    l2_add = torch.where(torch.isnan(l2), torch.zeros_like(l2), l2)  # defined exactly where the ECE is
    hist = reliability_histogram_counts(stats, cfg.options.right, per_image=gidx is not None)
    d.update(_pooled("", stats))
    d["macro_sum"] = macro_add.sum(1)
    d["macro_l2"] = l2_add.sum(0)
    d["macro_n"] = defined.sum(1)
    d["hist"] = hist.sum(0) if gidx is not None else hist
    d["images_with_class"] = (stats.sum_y.sum(-1) > 0).sum(0)
    d["num_nonfinite"] = torch.as_tensor(nonfinite, dtype=torch.int64, device=dev)
    d["num_images"] = torch.tensor(B, dtype=torch.int64, device=dev)
    if cfg.brier:
        moments = _moment_rows(cfg, run.stats)
        brier = brier_decomposition(BinnedStatsMoments(*rated, *moments)).brier  # NaN without voxels
        d["brier_sum"] = torch.where(torch.isnan(brier), torch.zeros_like(brier), brier).sum(0)
        d["sum_p2"], d["sum_py"] = (m.double().sum(0) for m in moments)
    if gidx is not None:
        gi = gidx.to(dev)
        _complete(cfg, d, dev, "group_")
        for k in ("count", "sum_p", "sum_y"):
            d["group_" + k].index_add_(0, gi, getattr(stats, k).double())
        d["group_macro_sum"].index_add_(0, gi, macro_add.movedim(1, 0))
        d["group_macro_l2"].index_add_(0, gi, l2_add)
        d["group_macro_n"].index_add_(0, gi, defined[0].long())
        d["group_hist"].index_add_(0, gi, hist)
        d["group_images"].index_add_(0, gi, torch.ones(B, dtype=torch.int64, device=dev))
    records: list[dict[str, Any]] = []
    if cfg.keep_records:
        start = int(seen)
        values = {"ece": errs.ece, "ace": errs.ace, "mce": errs.mce, "l2": errs.l2}
        if cfg.multi_rater:
            values.update(_rater_values(cfg, input, target, rated, run, spacing))
        if cfg.dice:
            o = cfg.options
            values["dice"] = hard_dice(
                input, target, cfg.classes, o.to_onehot_y, o.ignore_index, softmax=o.softmax, sigmoid=o.sigmoid
            )
        ids = list(image_ids) if image_ids is not None else list(range(start, start + B))
        extra = {"group": list(groups)} if groups is not None else None
        records = make_records(ids, cfg.row_names, values, stats.count.sum(-1), extra)
    _complete(cfg, d, dev)
    return Contribution(d, records, errs, B, warning, dev)


def _rater_values(
    cfg: MetricConfig, input: torch.Tensor, target: torch.Tensor, rated: BinnedStats, run: engine.Run, spacing: Any
) -> dict[str, torch.Tensor]:
    """Per-image multi-rater values for the records (marginal): volume CRPS from the statistics already computed
    (Σ p over the bins) against the raters' exact volumes (the bins' label counts up to 2**24 voxels per image,
    int64 :func:`calibops.evaluation.rater_label_counts` above, as :func:`calibops.functional.volume_crps`) and the
    consensus Dice."""
    if cfg.mode != "marginal":
        return {}
    B, D = input.shape[0], input.dim() - 2
    vox = engine.voxel_volume(spacing, B, D, rated.count.device).view(B, 1)
    v = rated.sum_p.double().sum(-1) * vox  # (B, C')
    if math.prod(input.shape[2:]) <= F._EXACT_FLOAT32_COUNT:  # float32 sums of 0/1 up to 2**24 are exact counts
        vols = rated.sum_y.double().sum(-1)  # (B, C', R)
    else:  # exact int64 counts, as functional.volume_crps: float32 sum_y stops counting above 2**24 voxels
        rater_maps = target.unsqueeze(1) if target.dim() == input.dim() - 1 else target
        vols = F._rater_volumes(input, rater_maps, cfg.stats_options, run)[:, cfg.classes[0] :].double()
    vols = vols * vox.unsqueeze(-1)
    crps = crps_gaussian(v, vols.mean(-1), vols.var(-1, unbiased=False).sqrt())
    o = cfg.options
    labels = target
    if labels.is_floating_point() or labels.dtype == torch.bool:  # as the statistics read them (engine.prepare)
        labels = labels.to(torch.int64)
    dice = F.consensus_dice(
        input, labels, to_onehot_y=True, softmax=o.softmax, sigmoid=o.sigmoid, ignore_index=o.ignore_index
    )
    return {"volume_crps": crps, "consensus_dice": dice[:, cfg.classes[0] :]}


# ------------------------------------------------------------------------------------------ classification
def _classification(
    cfg: MetricConfig, input: torch.Tensor, target: Any, groups: Sequence[Hashable] | None
) -> Contribution:
    """Samples (B, C) pooled into one population (and one per group): the pooled sums only."""
    C = cfg.num_classes
    if input.dim() != 2 or input.shape[1] != C:
        raise ValueError(f"classification input must be (B, {C}) (one row per sample), got {tuple(input.shape)}")
    B = input.shape[0]
    gidx = group_index(cfg, groups, B)
    labels = cfg.options.to_onehot_y
    if cfg.brier and not labels:
        raise ValueError("brier=True needs class indices (B,) as target (binary targets: y² = y)")
    x, t = engine.classification_layout(input.detach(), target, labels)
    opts = cfg.stats_options
    run = engine.run(x, t, opts, raise_nonfinite=cfg.nonfinite == "raise")
    warning = None
    if run.counts is not None and run.counts[1] > 0:  # nonfinite="skip": left out, counted
        warning = (
            f"DatasetCalibration: left out {run.counts[1]} non-finite probability value(s) of this batch of "
            "samples (counted in compute().nonfinite)"
        )
    stats = _rows(cfg, run.stats)
    dev = stats.count.device
    d = _pooled("", stats)
    if cfg.brier:
        d["sum_p2"], d["sum_py"] = (m.double().sum(0) for m in _moment_rows(cfg, run.stats))
    d["num_nonfinite"] = run.bad[1].to(torch.int64)
    if cfg.fine_options is not None:
        d.update(_pooled("fine_", _rows(cfg, engine.run(x, t, cfg.fine_options).stats)))
    _complete(cfg, d, dev)  # no per-image values: zeros
    if gidx is not None:  # one pooled population per group: the samples of each group present
        gdev = gidx.to(x.device)
        gopts = opts.replace(validate=False, moments=False)
        for g in gidx.unique().tolist():
            sel = gdev == g
            part = _rows(cfg, engine.run(x[:, :, sel], t[..., sel], gopts).stats)
            for k, v in _pooled("group_", part).items():
                d[k][g] += v
            d["group_images"][g] += int(sel.sum())
    d["num_images"] = torch.tensor(B, dtype=torch.int64, device=dev)
    return Contribution(d, [], None, B, warning, dev)
