"""The functional API: thin functions that build one :class:`~calibops.options.Options` and run the engine.

Every function takes ``(input, target)`` positionally and everything else keyword-only, with the library's one
default per option (docs/options.md). ``input`` is (B, C, *spatial) probabilities, or logits with ``softmax`` /
``sigmoid``; ``target`` is a label map with ``to_onehot_y=True`` ((B, 1, *spatial) or (B, *spatial); R rater maps
(B, R, *spatial) with ``multi_rater=True``), else one-hot / bool / soft labels of ``input``'s shape. One channel
(C = 1) follows MONAI's binary rule. Validation, non-finite values and the binary rule are described in
:mod:`calibops.engine`; the classification functions take (B, C) predictions with (B,) class indices
(``to_onehot_y=True``) or (B, C) one-hot / soft targets.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import engine
from .options import Options, options_from
from .results import (
    BinnedStats,
    BinnedStatsMoments,
    CalibrationErrors,
    calibration_errors_from_stats,
    reduce_loss,
)

__all__ = [
    "BinnedStats",
    "BinnedStatsMoments",
    "CalibrationErrors",
    "binned_stats",
    "brier_score",
    "calibration_errors",
    "classification_calibration_errors",
    "classification_marginal_l1_ace",
    "consensus_dice",
    "marginal_l1_ace",
    "volume_crps",
]

Weight = torch.Tensor | list[float] | tuple[float, ...] | float | None


def binned_stats(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    num_bins: int = 20,
    binning: str = "hard",
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    right: bool = False,
    backend: str = "auto",
    validate: bool = True,
    mode: str = "marginal",
    multi_rater: bool = False,
    moments: bool = False,
) -> BinnedStats:
    """Binned statistics ``BinnedStats(count, sum_p, sum_y)`` per image, float32 (docs/statistics.md).

    ``mode="marginal"``: one row per class, each (B, C', M). ``mode="top_label"``: per voxel the confidence
    ``max_c p`` and whether its class is the label, one row per image, each (B, M). ``multi_rater=True`` (with
    ``to_onehot_y=True``): ``target`` holds R rater label maps (B, R, *spatial) and ``sum_y`` gets a rater axis,
    (B, C', R, M) / (B, R, M). ``moments=True``: the result also carries ``sum_p2`` and ``sum_py`` of ``sum_p``'s
    shape (``sum_py`` against the rater mean). ``sum_p`` (and, for soft binning, ``count``; and the moments) are
    differentiable w.r.t. ``input``. float64 input gives float64 statistics under ``backend="auto"`` /
    ``"reference"`` (an explicitly named kernel backend computes float32).
    """
    o = options_from(locals())
    return engine.run(input, target, o).stats


def marginal_l1_ace(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    num_bins: int = 20,
    binning: str = "hard",
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_empty_classes: bool = True,
    weight: Weight = None,
    reduction: str = "mean",
    empty_weight: float = 0.01,
    right: bool = False,
    ignore_index: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    multi_rater: bool = False,
) -> torch.Tensor:
    """Marginal L1 Average Calibration Error (mL1-ACE), differentiable w.r.t. ``input``.

    ``multi_rater=True`` (with ``to_onehot_y``): ``target`` holds R rater label maps (B, R, *spatial) and the loss
    trains on the rater mean ``y = mean_r [label_r == c]`` (computed from the statistics; no (B, C, N) target is
    materialised). Returns a scalar (``reduction="mean"``/``"sum"``) or (B, C') for ``"none"``. The result is
    float32 for float32/float16/bfloat16 input. float64 input: ``backend="auto"`` (and ``"reference"``) computes
    it in float64 on the reference and returns float64, so ``torch.autograd.gradcheck`` passes with default
    arguments; a kernel backend named explicitly (``"cpu"``, ``"cuda"``, ``"triton"``) takes the input as float32
    and returns float32. The bin edges / centres are the contract's float32 values on every backend (also for
    float64 input), so float64 results differ from code that builds ``linspace(0, 1 + eps32)`` in float64
    (MONAI 1.7's losses) by ~1e-8. ``weight``: one finite value >= 0 per class used (or one number for all).
    With B = 0 the mean (like the sum) is 0.
    """
    o = options_from(locals())
    return engine.loss(input, target, o, weight)


def calibration_errors(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    num_bins: int = 20,
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    right: bool = False,
    backend: str = "auto",
    validate: bool = True,
    mode: str = "marginal",
    multi_rater: bool = False,
) -> CalibrationErrors:
    """Per-image ``CalibrationErrors(ece, ace, mce)`` (and ``l2``) over hard bins, no gradient.

    Marginal: each (B, C'); top-label (``mode="top_label"``): each (B,). With ``multi_rater=True`` one value per
    rater: (B, R, C') / (B, R) (their mean over raters is the multi-rater protocol's number). NaN where an image has
    no (non-ignored) voxel, never a silent 0. The papers' evaluation leaves the background out: pass
    ``include_background=False`` for their numbers.
    """
    o = options_from(locals())
    with torch.no_grad():
        stats = engine.run(input, target, o).stats
        if o.multi_rater:
            stats = engine.per_rater_stats(stats)
        return calibration_errors_from_stats(stats)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation protocols (docs/evaluation.md): small formulas over the fused statistics, no kernel of their own.


def brier_score(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    mode: str = "marginal",
    multi_rater: bool = False,
) -> torch.Tensor:
    """Brier score per image: marginal ``mean_i (p_c - y_c)²`` → (B, C'); top-label ``mean_i (q - [a == y])²``
    with ``q = max_c p``, ``a = argmax_c p`` → (B,). NaN where an image has no used voxel.

    Computed from one pass of the statistics with moments (``Σ p²``, ``Σ p ȳ``, ``Σ y``; no (B, C, N) one-hot
    target): ``(Σ p² - 2 Σ p y + Σ y²) / n``. ``multi_rater=True``: ``target`` holds R rater label maps and the
    result is the mean over raters of the per-rater Brier scores (``= Brier against the rater mean + the raters'
    mean disagreement variance``). Dense soft targets: ``Σ y²`` is read from the target directly (top-label: at
    the argmax of the input probabilities). Differentiable w.r.t. ``input``; float32 (float64 for float64 input).
    """
    o = options_from(locals(), num_bins=1, moments=True)
    run = engine.run(input, target, o)
    s = run.stats
    n = s.count[..., 0]
    sy = s.sum_y[..., 0]
    if o.multi_rater:
        sy = sy.mean(-1)  # (B, C', R) -> mean over raters: Σ y_r² = Σ y_r for binary labels
    if o.to_onehot_y:
        y2 = sy
    else:  # dense targets may be soft: Σ y² from the target itself, over the voxels the moments used
        B, C = input.shape[0], input.shape[1]
        t = target.detach().reshape(B, C, -1).to(s.count.dtype)
        zero = torch.zeros((), dtype=t.dtype, device=t.device)
        # a non-finite probability entry is left out of the moments (validate=False): leave its y² out too
        kept = _kept_entries(input, o, C if o.mode == "marginal" else 1) if _nonfinite_seen(run) else None
        if o.mode == "top_label":
            p = input.detach().reshape(B, C, -1).to(torch.float32)
            p = torch.softmax(p, 1) if (softmax and C > 1) else torch.sigmoid(p) if sigmoid else p
            t = t.gather(1, p.argmax(1, keepdim=True))[:, 0]
            if kept is not None:
                t = torch.where(kept[:, 0], t, zero)
            y2 = t.square().sum(-1)
        else:
            if kept is not None:
                t = torch.where(kept, t, zero)
            y2 = t.square().sum(-1)
            if not o.include_background and C > 1:
                y2 = y2[:, 1:]
    num = s.sum_p2[..., 0] - 2 * s.sum_py[..., 0] + y2
    out = num / n.clamp(min=1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


_CRPS_METHODS = ("closed_form", "curvas")
_EXACT_FLOAT32_COUNT = 2**24  # every integer up to 2**24 is a float32: a float32 sum of 0/1 values up to it is exact


def _kept_entries(input: torch.Tensor, o: Options, num_classes: int) -> torch.Tensor:
    """Which (image, class, voxel) probability entries the statistics used: finite after the activation (the
    non-finite rule of :mod:`calibops.engine`), bool (B, num_classes, N). Only needed when some entry was not."""
    B, C = input.shape[0], input.shape[1]
    x = input.detach().reshape(B, C, -1)
    x = x if x.dtype == torch.float64 else x.float()
    if o.softmax and C > 1:
        x = torch.softmax(x, 1)
    elif o.sigmoid:
        x = torch.sigmoid(x)
    finite = torch.isfinite(x)
    if o.mode == "top_label":
        finite = finite.all(1, keepdim=True)
    return finite.expand(B, num_classes, x.shape[-1]) if finite.shape[1] != num_classes else finite


def _nonfinite_seen(run: engine.Run) -> bool:
    """Whether the statistics left out a non-finite probability entry (always assumed while compiling)."""
    if torch.compiler.is_compiling():
        return True
    return (run.counts[1] if run.counts is not None else int(run.bad[1])) > 0


def _rater_volumes(input: torch.Tensor, target: torch.Tensor, o: Options, run: engine.Run) -> torch.Tensor:
    """Exact rater volumes in voxels of the used rows, (B, C', R): int64 counts from label maps
    (:func:`calibops.evaluation.rater_label_counts`), float64 sums of a dense target; the voxels the statistics
    leave out (a label outside [0, C) or ``ignore_index`` in any rater map, non-finite probabilities) are left out
    here too. The kernels' float32 ``sum_y`` stops counting exactly above 2**24 voxels."""
    from .evaluation import rater_label_counts

    B, C = input.shape[0], input.shape[1]
    if o.to_onehot_y:
        classes = 2 if C == 1 else C  # MONAI's binary rule: labels {0, 1} of the one channel
        keep = _kept_entries(input, o, classes) if _nonfinite_seen(run) else None
        vols = rater_label_counts(target, classes, o.ignore_index, keep)  # (B, classes, R)
    else:
        t = target.detach().reshape(B, C, -1).double()
        if _nonfinite_seen(run):
            t = torch.where(_kept_entries(input, o, C), t, torch.zeros((), dtype=t.dtype, device=t.device))
        vols = t.sum(-1, keepdim=True)  # (B, C, 1): one rater
    if C == 1 and o.to_onehot_y:
        return vols[:, 1:]
    return vols[:, 1:] if (not o.include_background and C > 1) else vols


def volume_crps(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    spacing: Any = None,
    method: str = "closed_form",
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """CRPS of the predicted volume against a Gaussian fitted to the raters' volumes, (B, C'), physical units.

    ``input`` (B, C, *spatial) probabilities (or logits with ``softmax`` / ``sigmoid``). ``target``: with
    ``to_onehot_y=True``, (B, R, *spatial) integer label maps of R raters (or (B, *spatial) for one); else one
    rater's one-hot / soft labels of ``input``'s shape. Predicted volume ``v = Σ_i p_c · voxel volume``; rater
    volumes ``V_r = #{i: label_r = c} · voxel volume``; ``μ = mean_r V_r``, ``σ`` their population standard
    deviation (as the CURVAS challenge). ``spacing``: voxel size along each spatial axis (a number for all axes, a
    sequence of D numbers, or a (B, D) tensor per image; default 1, i.e. voxel counts). ``method="closed_form"``:
    ``σ [z(2Φ(z) - 1) + 2φ(z) - 1/√π]``, ``z = (v - μ)/σ``, and ``|v - μ|`` for ``σ = 0``; differentiable w.r.t.
    ``input`` (a volume loss). ``method="curvas"``: the CURVAS 2024 evaluation's truncated integral
    (:func:`calibops.evaluation.crps_curvas`; 0 when ``σ = 0``), for comparability with its published numbers.
    Voxels with a label outside [0, C) (or ``ignore_index``) in any rater map are left out (and raise when
    validating, ``ignore_index`` excepted). Float64.
    """
    from .evaluation import crps_curvas, crps_gaussian

    if not isinstance(method, str) or method not in _CRPS_METHODS:
        raise ValueError(f"method must be one of {_CRPS_METHODS}, got {method!r}")
    o = options_from(locals(), num_bins=1, multi_rater=to_onehot_y)
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if input.dim() < 3:
        raise ValueError(f"volume_crps needs images: input (B, C, *spatial), got shape {tuple(input.shape)}")
    B, D = input.shape[0], input.dim() - 2
    if o.to_onehot_y and target.dim() == input.dim() - 1:
        target = target.unsqueeze(1)  # one rater
    vox = engine.voxel_volume(spacing, B, D, input.device)
    run = engine.run(input, target, o)
    v = run.stats.sum_p[..., 0].double() * vox.view(B, 1)  # (B, C')
    if math.prod(input.shape[2:]) <= _EXACT_FLOAT32_COUNT:  # float32 sums of 0/1 up to 2**24 are exact counts
        vols = (run.stats.sum_y[..., 0] if o.multi_rater else run.stats.sum_y).double()
    else:
        vols = _rater_volumes(input, target, o, run).double()
    vols = vols * vox.view(B, 1, 1)  # (B, C', R)
    mu = vols.mean(-1)
    sd = vols.var(-1, unbiased=False).sqrt()
    if method == "closed_form":
        return crps_gaussian(v, mu, sd)
    return crps_curvas(v, mu, sd)


def consensus_dice(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Dice of the hard prediction on the raters' consensus region, (B, C') float64 (a volume Dice).

    ``target``: with ``to_onehot_y=True``, (B, R, *spatial) label maps of R raters (or (B, *spatial) for one);
    else one rater's one-hot / soft labels of ``input``'s shape (foreground where ``y >= 0.5``). Per class, voxels
    where the raters disagree (some give the class, some do not: :func:`calibops.evaluation.consensus_masks`) are
    left out, and so are voxels that no rater labelled (every rater's label is ``ignore_index``): they are not
    agreed background. The reference is the voxels every labelling rater gives the class. The prediction is the
    argmax over classes (``p > 0.5`` per channel with ``sigmoid`` or one channel). NaN where the consensus
    reference is empty (MONAI's ``ignore_empty=True``). This is the Dice over the whole volume; the CURVAS 2024
    challenge's evaluation code averages the Dice of each (slice, row) line and leaves out row 0 of every slice
    (its masks reach MONAI's ``DiceMetric(include_background=False)`` without batch and channel axes), so the
    numbers differ (docs/evaluation.md).
    """
    from .evaluation import consensus_masks

    o = options_from(locals(), multi_rater=to_onehot_y)
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if input.dim() < 3:
        raise ValueError(f"consensus_dice needs images: input (B, C, *spatial), got shape {tuple(input.shape)}")
    B, C = input.shape[0], input.shape[1]
    if o.to_onehot_y:
        if target.dim() == input.dim() - 1:
            target = target.unsqueeze(1)  # one rater
        if target.dim() != input.dim() or target.shape[0] != B or tuple(target.shape[2:]) != tuple(input.shape[2:]):
            raise ValueError(
                f"target must be (B, R, *spatial) = ({B}, R, {', '.join(map(str, input.shape[2:]))}) rater label "
                f"maps with to_onehot_y=True, got {tuple(target.shape)}"
            )
        masks = consensus_masks(target, max(C, 2) if C == 1 else C, o.ignore_index)
        fg, keep = masks.foreground, ~(masks.dissensus | masks.unlabelled)
        if C == 1:  # the binary rule: label 1 is the foreground of the one channel
            fg, keep = fg[:, 1:], keep[:, 1:]
    else:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"target must have the shape of input {tuple(input.shape)} when to_onehot_y=False, got "
                f"{tuple(target.shape)} (for rater label maps pass to_onehot_y=True)"
            )
        fg = target.detach() >= 0.5
        keep = torch.ones_like(fg)
    x = input.detach()
    if C > 1 and not sigmoid:
        pred = torch.nn.functional.one_hot(x.argmax(1), C).movedim(-1, 1).bool()
    else:
        pred = x > (0.0 if sigmoid else 0.5)
    pred = (pred & keep).reshape(B, C, -1).double()
    ref = fg.reshape(B, C, -1).double()
    inter = (pred * ref).sum(-1)
    den = pred.sum(-1) + ref.sum(-1)
    dice = torch.where(ref.sum(-1) > 0, 2 * inter / den.clamp(min=1), torch.full_like(den, float("nan")))
    return dice[:, 1:] if (not o.include_background and C > 1) else dice


def classification_calibration_errors(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    num_bins: int = 20,
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    right: bool = False,
    backend: str = "auto",
    validate: bool = True,
    mode: str = "marginal",
) -> CalibrationErrors:
    """Calibration errors of a batch of classification predictions, pooled over the samples.

    ``input`` (B, C): one prediction per sample (probabilities, or logits with ``softmax`` / ``sigmoid``);
    ``target`` (B,) class indices with ``to_onehot_y=True`` (``ignore_index`` leaves a sample out), else (B, C)
    one-hot / soft labels. Every row is one sample of one population (unlike the segmentation functions, which
    compute one value per image). ``mode="marginal"``: (C',) per class; ``"top_label"`` (torchmetrics'
    ``MulticlassCalibrationError``): 0-d values. ``l2`` attribute included. NaN when no sample is used.
    """
    o = options_from(locals())
    x, t = engine.classification_layout(input, target, o.to_onehot_y)
    with torch.no_grad():
        return calibration_errors_from_stats(engine.run(x, t, o).stats).map(lambda e: e[0])


def classification_marginal_l1_ace(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    num_bins: int = 20,
    binning: str = "hard",
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_empty_classes: bool = True,
    weight: Weight = None,
    reduction: str = "mean",
    empty_weight: float = 0.01,
    right: bool = False,
    ignore_index: int | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """mL1-ACE loss of a batch of classification predictions (B, C), the samples pooled into one population.

    The per-image loss (:func:`marginal_l1_ace`) bins an image's voxels; here the B samples of the batch are the
    binned entries. Returns a scalar (``"mean"`` over classes / ``"sum"``) or (C',) (``"none"``); differentiable
    w.r.t. ``input``. ``target``: (B,) class indices with ``to_onehot_y=True``, else (B, C) one-hot / soft labels.
    """
    o = options_from(locals())
    x, t = engine.classification_layout(input, target, o.to_onehot_y)
    per_class = engine.loss(x, t, o.replace(reduction="none"), weight)[0]
    return reduce_loss(per_class, o.reduction)
