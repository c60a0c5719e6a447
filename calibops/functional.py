"""The functional API: validation, option handling, dispatch to a backend.

Every function takes the same option names (MONAI conventions):
``num_bins, binning, include_background, to_onehot_y, softmax, sigmoid, ignore_empty_classes, weight,
reduction, empty_weight, right, ignore_index, backend, validate``.

Validation (``validate=True``, the default) checks shapes, dtypes and option values (free: metadata only) and
the *values*: probabilities in [0, 1] and finite when neither softmax nor sigmoid is asked (one extra read of
the input: a single aminmax reduction), dense targets in [0, 1] (one read of the target), and labels in [0, C) or
``ignore_index`` (counted by the kernel itself, at the cost of one host synchronisation). ``validate=False``
(or the environment variable ``CALIBOPS_VALIDATE=0``) keeps the metadata checks and skips the value checks: use
it on the hot path of a training loop once the data pipeline is trusted. Nothing is validated while
``torch.compile`` traces (value checks would break the graph); kernels never read or write out of bounds
whatever the input — an out-of-range label is left out of the statistics.

Non-finite probabilities (NaN or ±inf after the activation: NaN logits, a +inf logit under softmax, or a voxel
whose logits are all -inf) are left out of every statistic by every backend and counted; with validation on,
any such entry raises a ``ValueError`` naming ``input``. Meta tensors are never value-checked (they hold no
values), like tensors seen while compiling. Option types and ranges are checked by
:func:`calibops._options.check_options`, the one place shared with the loss modules and ``DatasetCalibration``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import torch

from . import _backends
from ._contract import MODES, SCHEMES, TARGET_DENSE, TARGET_LABELS
from ._options import Options, check_options, check_weight_values
from .reference import (
    ACT_NONE,
    ACT_SIGMOID,
    ACT_SOFTMAX,
    BinnedStats,
    BinnedStatsMoments,
    CalibrationErrors,
    ace_from_stats,
    calibration_errors_from_stats,
    reduce_loss,
    scheme_edges,
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

_KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_ACTIVATION_NAMES = {ACT_NONE: "no activation", ACT_SOFTMAX: "softmax", ACT_SIGMOID: "sigmoid"}

#: The option checks (decision: one place, calibops/_options.py); kept under this name for callers.
_check_options = check_options


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _validate_values(validate: bool, device: torch.device) -> bool:
    """Whether the value checks run: validation on, not compiling, not a meta tensor, not CALIBOPS_VALIDATE=0."""
    if not validate or _compiling() or device.type == "meta":
        return False
    return os.environ.get("CALIBOPS_VALIDATE", "1").lower() not in ("0", "false", "no", "off")


def _label_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype == torch.bool:
        return 0, 1
    if dtype.is_floating_point:
        return -(2**63), 2**63 - 1  # float labels are converted to int64
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


class _Prepared:
    __slots__ = ("input", "target", "labels", "activation", "B", "C")


def _prepare(
    input, target, *, to_onehot_y, softmax, sigmoid, ignore_index, backend_name, check_values, multi_rater=False
):
    """Validate and reshape to the kernel layout: input [B, C, N], target [B, R, N] labels or [B, C, N] dense."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (B, C, *spatial), got shape {tuple(input.shape)}")
    if input.dim() == 2:  # not B one-voxel images: one prediction per sample is a classification batch
        raise ValueError(
            f"input has shape (B, C) = {tuple(input.shape)} with no spatial axis: for classification predictions "
            "(one row per sample, pooled over the batch) use calibops.functional.classification_calibration_errors "
            "/ classification_marginal_l1_ace or DatasetCalibration(..., classification=True); for B images of "
            "one voxel each pass input[..., None] (B, C, 1)"
        )
    if not input.is_floating_point():
        raise TypeError(
            f"input must be floating point (float32, float16 or bfloat16 probabilities or logits), got {input.dtype}"
        )
    B, C = input.shape[0], input.shape[1]
    if C < 1:
        raise ValueError(f"input must have at least one class (dim 1), got shape {tuple(input.shape)}")
    spatial = tuple(input.shape[2:])
    N = math.prod(spatial)
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}: move them to one device")
    if target.dim() >= 1 and target.shape[0] != B:
        raise ValueError(
            f"target batch size {target.shape[0]} does not match input batch size {B} "
            f"(input {tuple(input.shape)}, target {tuple(target.shape)})"
        )

    kernel = backend_name != "reference"
    x = input
    if kernel and x.dtype not in _KERNEL_INPUT_DTYPES:
        x = x.float()
    x = x.reshape(B, C, N)
    if kernel:
        x = x.contiguous()

    if to_onehot_y:
        shape = tuple(target.shape)
        if multi_rater:
            if len(shape) != 2 + len(spatial) or shape[2:] != spatial or shape[1] < 1:
                raise ValueError(
                    f"target must hold R >= 1 rater label maps of shape (B, R, *spatial) with *spatial = {spatial} "
                    f"when multi_rater=True, got {shape}"
                )
            R = shape[1]
        elif shape not in ((B, *spatial), (B, 1, *spatial)):
            hint = ""
            if len(shape) == 2 + len(spatial) and shape[2:] == spatial:
                hint = " (several rater label maps: pass multi_rater=True)"
            raise ValueError(
                f"target must be a label map of shape (B, 1, *spatial) or (B, *spatial) = {(B, 1, *spatial)} or "
                f"{(B, *spatial)} when to_onehot_y=True, got {shape}{hint}"
            )
        else:
            R = 1
        t = target
        if ignore_index is not None and (t.dtype == torch.bool or t.dtype in _LABEL_DTYPES or t.is_floating_point()):
            lo, hi = _label_range(t.dtype)
            if not lo <= ignore_index <= hi:
                raise ValueError(
                    f"ignore_index={ignore_index} can never match a {t.dtype} label (values {lo}..{hi}): pass the "
                    "label value to leave out, within the labels' dtype"
                )
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        elif t.is_floating_point():
            if check_values and bool((t != t.round()).any()):
                raise ValueError("target holds non-integer label values; to_onehot_y=True expects class indices")
            t = t.to(torch.int64)
        elif t.dtype not in _LABEL_DTYPES:
            raise TypeError(f"target labels must be an integer tensor, got {t.dtype}")
        t = t.reshape(B, R, N)
        if kernel:
            t = t.contiguous()
        labels = True
    else:
        if tuple(target.shape) != tuple(input.shape):
            hint = " (for integer label maps pass to_onehot_y=True)" if not target.is_floating_point() else ""
            raise ValueError(
                f"target must have the shape of input {tuple(input.shape)} when to_onehot_y=False, "
                f"got {tuple(target.shape)}{hint}"
            )
        t = target
        if t.is_complex():
            raise TypeError(f"target must be real (one-hot, bool or soft labels in [0, 1]), got {t.dtype}")
        if check_values and t.dtype != torch.bool and t.numel() > 0:
            lo, hi = torch.aminmax(t.detach()) if t.is_floating_point() else torch.aminmax(t)
            if not (bool(lo >= 0) and bool(hi <= 1)):
                raise ValueError(
                    f"target values must lie in [0, 1] (one-hot or soft labels), found range [{float(lo)}, {float(hi)}]"
                    "; for integer label maps pass to_onehot_y=True"
                )
        if t.dtype not in _KERNEL_DENSE_DTYPES and not (not kernel and t.dtype == torch.float64):
            t = t.float()  # integer / other dense targets: as float32 (the reference also keeps float64)
        t = t.detach().reshape(B, C, N)
        if kernel:
            t = t.contiguous()
        labels = False

    if softmax:
        activation = ACT_SOFTMAX
    elif sigmoid:
        activation = ACT_SIGMOID
    else:
        activation = ACT_NONE
        if check_values and x.numel() > 0:
            # one reduction: aminmax propagates NaN, and NaN fails both comparisons below
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if not (lo >= 0 and hi <= 1):
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError(
                        "input holds non-finite values; pass probabilities in [0, 1], "
                        "or logits with softmax=True/sigmoid=True"
                    )
                raise ValueError(
                    f"input probabilities must lie in [0, 1], found range [{lo}, {hi}]; "
                    "for logits pass softmax=True or sigmoid=True"
                )
    prep = _Prepared()
    prep.input, prep.target, prep.labels, prep.activation, prep.B, prep.C = x, t, labels, activation, B, C
    return prep


class _Run(NamedTuple):
    """What :func:`_stats` hands back: the statistics, the kernel's ``bad`` counts and their host copy."""

    # public shapes: marginal (B, C', M) with sum_y (B, C', R, M); top-label (B, M) with sum_y (B, R, M); the
    # rater axis is dropped unless multi_rater. Background dropped (marginal) unless include_background.
    stats: BinnedStats
    bad: torch.Tensor  # int64 (2,) on the input's device: [labels outside [0, C), non-finite probability entries]
    counts: list[int] | None  # host copy of ``bad`` when the values were checked (one synchronisation), else None
    weight: torch.Tensor | None  # the checked weight, float32 (C',) on the input's device
    num_classes: int  # C of the input (before dropping the background)


def _nonfinite_message(n: int, activation: int) -> str:
    what = {
        ACT_SOFTMAX: "a NaN or +inf logit makes every probability of its voxel NaN, and so do all -inf logits",
        ACT_SIGMOID: "NaN logits give NaN probabilities",
        ACT_NONE: "the probabilities themselves are NaN or infinite",
    }[activation]
    return (
        f"input holds {n} non-finite probability value(s) after {_ACTIVATION_NAMES[activation]} ({what}); "
        "fix the predictions upstream, or pass validate=False to leave such entries out of every statistic "
        "(counted, never NaN)"
    )


def _stats(input: Any, target: Any, o: Options, *, raise_nonfinite: bool = True, weight: Any = None) -> _Run:
    """Shared path of every public function: resolve backend, prepare, run the statistics op, check its
    ``bad`` counts (and ``weight``'s values) in one host synchronisation, drop the background."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    name = _backends.resolve_backend(o.backend, input.device, input.dtype)
    check = _validate_values(o.validate, input.device)
    prep = _prepare(
        input,
        target,
        to_onehot_y=o.to_onehot_y,
        softmax=o.softmax,
        sigmoid=o.sigmoid,
        ignore_index=o.ignore_index,
        backend_name=name,
        check_values=check,
        multi_rater=o.multi_rater,
    )
    top = o.mode == "top_label"
    drop_background = not o.include_background and prep.C > 1 and not top
    w, w_bad = _check_weight(weight, prep.C - 1 if drop_background else prep.C, input.device, check)
    scheme = SCHEMES[o.binning]
    edges = scheme_edges(o.num_bins, scheme, input.device)
    fn = _backends.stats_function(name)
    count, sum_p, sum_y, sum_p2, sum_py, bad = fn(
        prep.input,
        prep.target,
        edges,
        o.num_bins,
        scheme,
        prep.activation,
        TARGET_LABELS if prep.labels else TARGET_DENSE,
        MODES[o.mode],
        o.moments,
        o.ignore_index,
        o.right,
    )
    counts = None
    # probabilities given directly were range-checked (finite included) in _prepare, so without labels, an
    # activation or a weight tensor there is nothing left to read back
    if check and (prep.labels or prep.activation != ACT_NONE or w_bad is not None):
        both = bad if w_bad is None else torch.cat([bad, w_bad.view(1)])
        counts = both.tolist()  # the one host synchronisation of a validated call
        if counts[0] > 0:
            allowed = f"[0, {prep.C})" + (f" or ignore_index={o.ignore_index}" if o.ignore_index is not None else "")
            raise ValueError(f"target holds {counts[0]} label(s) outside {allowed} (input has C={prep.C} classes)")
        if raise_nonfinite and counts[1] > 0:
            raise ValueError(_nonfinite_message(counts[1], prep.activation))
        if w_bad is not None and counts[2] > 0:
            raise ValueError(f"weight must be finite and >= 0, got {w.tolist()}")
        counts = counts[:2]
    if not o.include_background and not top and prep.C == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
    if top:  # one statistic row per image: drop the row axis
        rows = slice(0, 1)
    else:
        rows = slice(1, None) if drop_background else slice(None)
    moments = (sum_p2, sum_py) if o.moments else (None, None)
    parts = [count, sum_p, sum_y, *moments]
    parts = [None if t is None else t[:, rows] for t in parts]
    if top:
        parts = [None if t is None else t[:, 0] for t in parts]
    if not o.multi_rater:
        parts[2] = parts[2].select(-2, 0)  # the one rater
    stats = BinnedStats(*parts[:3]) if not o.moments else BinnedStatsMoments(*parts)
    return _Run(stats, bad, counts, w, prep.C)


def _check_weight(
    weight: Any, num_classes: int, device: torch.device, check: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight as float32 (C',) on ``device``, device count of bad entries to read back or None).

    Types and host values (lists, NumPy) are checked by :func:`calibops._options.check_weight_values`; a
    tensor's values are counted here and read back with the statistics' ``bad`` counts (validation on only).
    """
    w = check_weight_values(weight)
    if w is None:
        return None, None
    tensor_given = isinstance(weight, torch.Tensor)
    w = w.to(device)
    if w.dim() == 0:
        w = w.expand(num_classes)
    if w.dim() != 1 or w.shape[0] != num_classes:
        raise ValueError(
            f"weight must have one entry per class used ({num_classes} after include_background), "
            f"got shape {tuple(w.shape)}"
        )
    w_bad = None
    if tensor_given and check and w.device.type != "meta":
        w_bad = (~torch.isfinite(w) | (w < 0)).sum()
    return w, w_bad


def binned_stats(
    input: torch.Tensor,
    target: torch.Tensor,
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
    *,
    mode: str = "marginal",
    multi_rater: bool = False,
    moments: bool = False,
) -> BinnedStats:
    """Binned statistics ``BinnedStats(count, sum_p, sum_y)`` per image, float32 (docs/statistics.md).

    ``mode="marginal"``: one row per class, each (B, C', M). ``mode="top_label"``: per voxel the confidence
    ``max_c p`` and whether its class is the label, one row per image, each (B, M) (``include_background`` does not
    apply: the argmax runs over every class). ``multi_rater=True`` (with ``to_onehot_y=True``): ``target`` holds R
    rater label maps (B, R, *spatial) and ``sum_y`` gets a rater axis, (B, C', R, M) / (B, R, M).
    ``moments=True``: the result also carries ``sum_p2`` and ``sum_py`` of ``sum_p``'s shape (``sum_py`` against the
    rater mean). ``sum_p`` (and, for soft binning, ``count``; and the moments) are differentiable w.r.t. ``input``.
    See the module docstring for the other options and validation.
    """
    o = check_options(
        num_bins=num_bins,
        binning=binning,
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
        moments=moments,
    )
    return _stats(input, target, o).stats


def marginal_l1_ace(
    input: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    binning: str = "hard",
    include_background: bool = True,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_empty_classes: bool = True,
    weight: torch.Tensor | list[float] | tuple[float, ...] | None = None,
    reduction: str = "mean",
    empty_weight: float = 0.01,
    right: bool = False,
    ignore_index: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    *,
    multi_rater: bool = False,
) -> torch.Tensor:
    """Marginal L1 Average Calibration Error (mL1-ACE), differentiable w.r.t. ``input``.

    ``input`` (B, C, *spatial): probabilities, or logits with ``softmax``/``sigmoid``. ``target``: integer labels
    (B, 1, *spatial) or (B, *spatial) with ``to_onehot_y``, else one-hot/bool/soft labels of ``input``'s shape.
    ``multi_rater=True`` (with ``to_onehot_y``): ``target`` holds R rater label maps (B, R, *spatial) and the loss
    trains on the rater mean ``y = mean_r [label_r == c]`` (computed from the statistics; no (B, C, N) target is
    materialised). Returns a scalar (``reduction="mean"``/``"sum"``) or (B, C') for ``"none"``, in float32 (float64
    for float64 input) whatever the input dtype. ``weight``: one finite value >= 0 per class used (or one for all).
    With B = 0 the mean (like the sum) is 0.
    """
    o = check_options(
        num_bins=num_bins,
        binning=binning,
        include_background=include_background,
        to_onehot_y=to_onehot_y,
        softmax=softmax,
        sigmoid=sigmoid,
        ignore_empty_classes=ignore_empty_classes,
        reduction=reduction,
        empty_weight=empty_weight,
        right=right,
        ignore_index=ignore_index,
        backend=backend,
        validate=validate,
        multi_rater=multi_rater,
    )
    run = _stats(input, target, o, weight=weight)
    stats = run.stats
    if o.multi_rater:  # the rater mean: sum_y is linear in y, so Σ w·mean_r y_r = mean_r Σ w·y_r
        stats = BinnedStats(stats.count, stats.sum_p, stats.sum_y.mean(-2))
    per_class = ace_from_stats(
        stats,
        soft=o.binning == "soft",
        empty_weight=o.empty_weight,
        ignore_empty_classes=o.ignore_empty_classes,
        weight=run.weight,
    )
    return reduce_loss(per_class, o.reduction)


def per_rater_stats(stats: BinnedStats) -> BinnedStats:
    """Multi-rater statistics (count (..., M), sum_y (..., R, M)) as R stacked single-rater statistics with the
    rater axis first after the image axis: (B, R, ..., M) each (count and sum_p repeated; a view, no copy)."""
    sum_y = stats.sum_y.movedim(-2, 1)  # (B, R, ..., M)
    R = sum_y.shape[1]

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(t.shape[0], R, *t.shape[1:])

    return BinnedStats(rep(stats.count), rep(stats.sum_p), sum_y)


def calibration_errors(
    input: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 20,
    include_background: bool = False,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    right: bool = False,
    backend: str = "auto",
    validate: bool = True,
    *,
    mode: str = "marginal",
    multi_rater: bool = False,
) -> CalibrationErrors:
    """Per-image ``CalibrationErrors(ece, ace, mce)`` over hard bins, no gradient.

    Marginal: each (B, C'); top-label (``mode="top_label"``): each (B,). With ``multi_rater=True`` one value per
    rater: (B, R, C') / (B, R) (their mean over raters is the multi-rater protocol's number). NaN where an image has
    no (non-ignored) voxel, never a silent 0. ``include_background`` defaults to False like the papers' evaluation
    code (marginal mode only).
    """
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
    with torch.no_grad():
        stats = _stats(input, target, o).stats
        if o.multi_rater:
            stats = per_rater_stats(stats)
        return calibration_errors_from_stats(stats)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation protocols (docs/evaluation.md): small formulas over the fused statistics, no kernel of their own.


def brier_score(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    mode: str = "marginal",
    include_background: bool = False,
    to_onehot_y: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    multi_rater: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Brier score per image: marginal ``mean_i (p_c - y_c)²`` → (B, C'); top-label ``mean_i (q - [a == y])²``
    with ``q = max_c p``, ``a = argmax_c p`` → (B,). NaN where an image has no used voxel.

    Computed from one pass of the statistics with moments (``Σ p²``, ``Σ p ȳ``, ``Σ y``; no (B, C, N) one-hot
    target): ``(Σ p² - 2 Σ p y + Σ y²) / n``. ``multi_rater=True``: ``target`` holds R rater label maps and the
    result is the mean over raters of the per-rater Brier scores (``= Brier against the rater mean + the raters'
    mean disagreement variance``). Dense soft targets: ``Σ y²`` is read from the target directly (top-label: at
    the argmax of the input probabilities). Differentiable w.r.t. ``input``; float32 (float64 for float64 input).
    """
    o = check_options(
        num_bins=1,
        include_background=include_background,
        to_onehot_y=to_onehot_y,
        softmax=softmax,
        sigmoid=sigmoid,
        ignore_index=ignore_index,
        backend=backend,
        validate=validate,
        mode=mode,
        multi_rater=multi_rater,
        moments=True,
    )
    run = _stats(input, target, o)
    s = run.stats
    n = s.count[..., 0]
    sy = s.sum_y[..., 0]
    if o.multi_rater:
        sy = sy.mean(-1)  # (B, C', R) -> mean over raters: Σ y_r² = Σ y_r for binary labels
    if o.to_onehot_y:
        y2 = sy
    else:  # dense targets may be soft: Σ y² from the target itself
        B, C = input.shape[0], input.shape[1]
        t = target.detach().reshape(B, C, -1).to(s.count.dtype)
        if o.mode == "top_label":
            p = input.detach().reshape(B, C, -1).to(torch.float32)
            p = torch.softmax(p, 1) if softmax else torch.sigmoid(p) if sigmoid else p
            t = t.gather(1, p.argmax(1, keepdim=True))[:, 0]
            y2 = t.square().sum(-1)
        else:
            y2 = t.square().sum(-1)
            if not o.include_background and C > 1:
                y2 = y2[:, 1:]
    num = s.sum_p2[..., 0] - 2 * s.sum_py[..., 0] + y2
    out = num / n.clamp(min=1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def _voxel_volume(spacing: Any, B: int, D: int, device: torch.device) -> torch.Tensor:
    """Voxel volume per image, float64 (B,): the product of the spacing along the D spatial axes."""
    if spacing is None:
        return torch.ones(B, dtype=torch.float64, device=device)
    if isinstance(spacing, (int, float)) and not isinstance(spacing, bool):
        s = torch.full((D,), float(spacing), dtype=torch.float64)
    else:
        try:
            s = torch.as_tensor(spacing, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"spacing must be None, a number, a sequence of {D} numbers or a (B, {D}) tensor, got {spacing!r}"
            ) from None
    s = s.to(device)
    if s.dim() == 0:
        s = s.expand(D)
    if s.dim() == 1:
        s = s.unsqueeze(0).expand(B, -1)
    if s.dim() != 2 or s.shape != (B, D):
        raise ValueError(
            f"spacing must hold one value per spatial axis ({D}), or a (B, D) = ({B}, {D}) tensor for per-image "
            f"spacing, got shape {tuple(s.shape)}"
        )
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"spacing must be finite and > 0, got {s.tolist()}")
    return s.prod(1)


_CRPS_METHODS = ("closed_form", "curvas")


def volume_crps(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    spacing: Any = None,
    method: str = "closed_form",
    include_background: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """CRPS of the predicted volume against a Gaussian fitted to the raters' volumes, (B, C'), physical units.

    ``input`` (B, C, *spatial) probabilities (or logits with ``softmax`` / ``sigmoid``); ``target`` (B, R,
    *spatial) integer label maps of R raters (or (B, *spatial) for one). Predicted volume ``v = Σ_i p_c ·
    voxel volume``; rater volumes ``V_r = #{i: label_r = c} · voxel volume``; ``μ = mean_r V_r``, ``σ`` their
    population standard deviation (as the CURVAS challenge). ``spacing``: voxel size along each spatial axis (a
    number for all axes, a sequence of D numbers, or a (B, D) tensor per image; default 1, i.e. voxel counts).
    ``method="closed_form"``: ``σ [z(2Φ(z) - 1) + 2φ(z) - 1/√π]``, ``z = (v - μ)/σ``, and ``|v - μ|`` for
    ``σ = 0``; differentiable w.r.t. ``input`` (a volume loss). ``method="curvas"``: the CURVAS 2024 evaluation's
    truncated integral (:func:`calibops.evaluation.crps_curvas`; 0 when ``σ = 0``), for comparability with its
    published numbers. Voxels with a label outside [0, C) in any rater map are left out (and raise when
    validating). Float64.
    """
    from .evaluation import crps_curvas, crps_gaussian

    if not isinstance(method, str) or method not in _CRPS_METHODS:
        raise ValueError(f"method must be one of {_CRPS_METHODS}, got {method!r}")
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if input.dim() < 3:
        raise ValueError(f"volume_crps needs images: input (B, C, *spatial), got shape {tuple(input.shape)}")
    B, D = input.shape[0], input.dim() - 2
    if target.dim() == input.dim() - 1:
        target = target.unsqueeze(1)  # one rater
    o = check_options(
        num_bins=1,
        include_background=include_background,
        to_onehot_y=True,
        softmax=softmax,
        sigmoid=sigmoid,
        backend=backend,
        validate=validate,
        multi_rater=True,
    )
    vox = _voxel_volume(spacing, B, D, input.device)
    s = _stats(input, target, o).stats
    v = s.sum_p[..., 0].double() * vox.view(B, 1)  # (B, C')
    vols = s.sum_y[..., 0].double() * vox.view(B, 1, 1)  # (B, C', R)
    mu = vols.mean(-1)
    sd = vols.var(-1, unbiased=False).sqrt()
    if method == "closed_form":
        return crps_gaussian(v, mu, sd)
    return crps_curvas(v, mu, sd)


def consensus_dice(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    include_background: bool = False,
    softmax: bool = False,
    sigmoid: bool = False,
) -> torch.Tensor:
    """Dice of the hard prediction on the raters' consensus region, (B, C') float64 (the CURVAS protocol).

    ``target`` (B, R, *spatial): R rater label maps. Per class, voxels where the raters disagree (some give the
    class, some do not: :func:`calibops.evaluation.consensus_masks`) are left out; the reference is the voxels
    every rater labels with the class. The prediction is the argmax over classes (``p > 0.5`` per channel with
    ``sigmoid`` or one channel). NaN where the consensus reference is empty (MONAI's ``ignore_empty=True``).
    """
    from .evaluation import consensus_masks

    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if input.dim() < 3 or target.dim() != input.dim() or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"input must be (B, C, *spatial) and target (B, R, *spatial) rater label maps, got {tuple(input.shape)} "
            f"and {tuple(target.shape)}"
        )
    if tuple(target.shape[2:]) != tuple(input.shape[2:]):
        raise ValueError(
            f"target spatial shape {tuple(target.shape[2:])} differs from input's {tuple(input.shape[2:])}"
        )
    B, C = input.shape[0], input.shape[1]
    masks = consensus_masks(target, C)
    x = input.detach()
    if C > 1 and not sigmoid:
        pred = torch.nn.functional.one_hot(x.argmax(1), C).movedim(-1, 1).bool()
    else:
        pred = x > (0.0 if sigmoid or softmax else 0.5)
    keep = ~masks.dissensus
    pred = (pred & keep).reshape(B, C, -1).double()
    ref = masks.foreground.reshape(B, C, -1).double()
    inter = (pred * ref).sum(-1)
    den = pred.sum(-1) + ref.sum(-1)
    dice = torch.where(ref.sum(-1) > 0, 2 * inter / den.clamp(min=1), torch.full_like(den, float("nan")))
    return dice[:, 1:] if (not include_background and C > 1) else dice


def _classification_layout(input: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(B, C) predictions and (B,) labels or (B, C) dense targets as one pooled 'image': (1, C, B), (1, B) or
    (1, C, B); returns the reshaped pair and whether the target holds labels."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be torch.Tensors")
    if input.dim() != 2:
        raise ValueError(
            f"classification input must be (B, C) predictions (one row per sample), got shape {tuple(input.shape)}; "
            "for segmentation (B, C, *spatial) use the per-image functions"
        )
    B, C = input.shape
    if target.dim() == 1 and target.shape[0] == B:
        return input.t().unsqueeze(0), target.unsqueeze(0), True
    if tuple(target.shape) == (B, C):
        return input.t().unsqueeze(0), target.t().unsqueeze(0), False
    raise ValueError(
        f"classification target must be (B,) = ({B},) class indices or (B, C) = ({B}, {C}) one-hot/soft labels, "
        f"got shape {tuple(target.shape)}"
    )


def classification_calibration_errors(
    input: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 15,
    *,
    mode: str = "top_label",
    include_background: bool = True,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_index: int | None = None,
    right: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> CalibrationErrors:
    """Calibration errors of a batch of classification predictions, pooled over the samples.

    ``input`` (B, C): one prediction per sample (probabilities, or logits with ``softmax`` / ``sigmoid``);
    ``target`` (B,) class indices (``ignore_index`` leaves a sample out) or (B, C) one-hot / soft labels. Every
    row is one sample of one population (unlike the segmentation functions, which compute one value per image).
    ``mode="top_label"`` (default, torchmetrics' ``MulticlassCalibrationError``): 0-d values; ``"marginal"``:
    (C',) per class (``include_background`` defaults to True here: class 0 is an ordinary class). ``l2`` attribute
    included. NaN when no sample is used.
    """
    x, t, labels = _classification_layout(input, target)
    o = check_options(
        num_bins=num_bins,
        include_background=include_background,
        to_onehot_y=labels,
        softmax=softmax,
        sigmoid=sigmoid,
        ignore_index=ignore_index,
        right=right,
        backend=backend,
        validate=validate,
        mode=mode,
    )
    with torch.no_grad():
        return calibration_errors_from_stats(_stats(x, t, o).stats).map(lambda e: e[0])


def classification_marginal_l1_ace(
    input: torch.Tensor,
    target: torch.Tensor,
    num_bins: int = 15,
    binning: str = "hard",
    *,
    include_background: bool = True,
    softmax: bool = False,
    sigmoid: bool = False,
    ignore_empty_classes: bool = True,
    weight: torch.Tensor | list[float] | tuple[float, ...] | None = None,
    empty_weight: float = 0.01,
    ignore_index: int | None = None,
    reduction: str = "mean",
    right: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """mL1-ACE loss of a batch of classification predictions (B, C), the samples pooled into one population.

    The per-image loss (:func:`marginal_l1_ace`) bins an image's voxels; here the B samples of the batch are the
    binned entries. Returns a scalar (``"mean"`` over classes / ``"sum"``) or (C',) (``"none"``); differentiable
    w.r.t. ``input``. ``target``: (B,) class indices or (B, C) one-hot / soft labels.
    """
    x, t, labels = _classification_layout(input, target)
    loss = marginal_l1_ace(
        x,
        t,
        num_bins=num_bins,
        binning=binning,
        include_background=include_background,
        to_onehot_y=labels,
        softmax=softmax,
        sigmoid=sigmoid,
        ignore_empty_classes=ignore_empty_classes,
        weight=weight,
        reduction="none",
        empty_weight=empty_weight,
        right=right,
        ignore_index=ignore_index,
        backend=backend,
        validate=validate,
    )[0]
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    return reduce_loss(loss, reduction)
