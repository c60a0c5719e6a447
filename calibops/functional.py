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
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from . import _backends
from .reference import (
    ACT_NONE,
    ACT_SIGMOID,
    ACT_SOFTMAX,
    BinnedStats,
    CalibrationErrors,
    _edge_tensor,
    ace_from_stats,
    calibration_errors_from_stats,
    reduce_loss,
)

__all__ = ["BinnedStats", "CalibrationErrors", "binned_stats", "calibration_errors", "marginal_l1_ace"]

_KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_BINNINGS = ("hard", "soft")
_REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _validate_values(validate: bool) -> bool:
    if not validate or _compiling():
        return False
    return os.environ.get("CALIBOPS_VALIDATE", "1").lower() not in ("0", "false", "no", "off")


def _check_options(
    num_bins, binning, softmax, sigmoid, ignore_index, right, to_onehot_y, empty_weight=0.01, reduction="mean"
):
    if isinstance(num_bins, bool) or not isinstance(num_bins, int):
        raise TypeError(f"num_bins must be an int >= 1, got {type(num_bins).__name__}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if binning not in _BINNINGS:
        raise ValueError(f"binning must be one of {_BINNINGS}, got {binning!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softmax and sigmoid:
        raise ValueError("softmax=True and sigmoid=True are mutually exclusive: pick one activation")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
        if not to_onehot_y:
            raise ValueError(
                "ignore_index applies to integer label maps: pass to_onehot_y=True with labels, "
                "or drop ignore_index for one-hot/soft targets"
            )
    if not isinstance(right, bool):
        raise TypeError(f"right must be a bool, got {type(right).__name__}")
    if isinstance(empty_weight, bool) or not isinstance(empty_weight, (int, float)) or not (
        math.isfinite(empty_weight) and empty_weight >= 0
    ):
        raise ValueError(f"empty_weight must be a finite number >= 0, got {empty_weight!r}")


class _Prepared:
    __slots__ = ("input", "target", "labels", "activation", "B", "C")


def _prepare(input, target, *, to_onehot_y, softmax, sigmoid, ignore_index, backend_name, check_values):
    """Validate and reshape to the kernel layout: input [B, C, N], target [B, N] labels or [B, C, N] dense."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (B, C, *spatial), got shape {tuple(input.shape)}")
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
        if shape not in ((B, *spatial), (B, 1, *spatial)):
            raise ValueError(
                f"target must be a label map of shape (B, 1, *spatial) or (B, *spatial) = {(B, 1, *spatial)} or "
                f"{(B, *spatial)} when to_onehot_y=True, got {shape}"
            )
        t = target
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        elif t.is_floating_point():
            if check_values and bool((t != t.round()).any()):
                raise ValueError("target holds non-integer label values; to_onehot_y=True expects class indices")
            t = t.to(torch.int64)
        elif t.dtype not in _LABEL_DTYPES:
            raise TypeError(f"target labels must be an integer tensor, got {t.dtype}")
        t = t.reshape(B, N)
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
        if kernel and t.dtype not in _KERNEL_DENSE_DTYPES:
            t = t.float()
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


def _stats(
    input, target, *, num_bins, binning, include_background, to_onehot_y, softmax, sigmoid, ignore_index, right,
    backend, validate,
) -> BinnedStats:
    """Shared path of every public function: resolve backend, prepare, run the statistics op, drop background."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    name = _backends.resolve_backend(backend, input.device)
    check = _validate_values(validate)
    prep = _prepare(
        input, target, to_onehot_y=to_onehot_y, softmax=softmax, sigmoid=sigmoid, ignore_index=ignore_index,
        backend_name=name, check_values=check,
    )
    soft = binning == "soft"
    edges = _edge_tensor(num_bins, soft, input.device)
    fn = _backends.stats_function(name)
    count, sum_p, sum_y, bad = fn(
        prep.input, prep.target, edges, num_bins, soft, prep.activation, prep.labels, ignore_index, right
    )
    if check and prep.labels and int(bad) > 0:
        allowed = f"[0, {prep.C})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"target holds {int(bad)} label(s) outside {allowed} (input has C={prep.C} classes)")
    if not include_background:
        if prep.C == 1:
            warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
        else:
            count, sum_p, sum_y = count[:, 1:], sum_p[:, 1:], sum_y[:, 1:]
    return BinnedStats(count, sum_p, sum_y)


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
) -> BinnedStats:
    """Per-image, per-class binned statistics ``BinnedStats(count, sum_p, sum_y)``, each (B, C', M) float32.

    ``sum_p`` (and, for soft binning, ``count``) is differentiable w.r.t. ``input``. See the module docstring for
    the options and validation.
    """
    _check_options(num_bins, binning, softmax, sigmoid, ignore_index, right, to_onehot_y)
    return _stats(
        input, target, num_bins=num_bins, binning=binning, include_background=include_background,
        to_onehot_y=to_onehot_y, softmax=softmax, sigmoid=sigmoid, ignore_index=ignore_index, right=right,
        backend=backend, validate=validate,
    )


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
) -> torch.Tensor:
    """Marginal L1 Average Calibration Error (mL1-ACE), differentiable w.r.t. ``input``.

    ``input`` (B, C, *spatial): probabilities, or logits with ``softmax``/``sigmoid``. ``target``: integer labels
    (B, 1, *spatial) or (B, *spatial) with ``to_onehot_y``, else one-hot/bool/soft labels of ``input``'s shape.
    Returns a scalar (``reduction="mean"``/``"sum"``) or (B, C') for ``"none"``, in float32 (float64 for float64
    input) whatever the input dtype.
    """
    _check_options(num_bins, binning, softmax, sigmoid, ignore_index, right, to_onehot_y, empty_weight, reduction)
    stats = _stats(
        input, target, num_bins=num_bins, binning=binning, include_background=include_background,
        to_onehot_y=to_onehot_y, softmax=softmax, sigmoid=sigmoid, ignore_index=ignore_index, right=right,
        backend=backend, validate=validate,
    )
    w = _check_weight(weight, stats.count.shape[1], input.device)
    per_class = ace_from_stats(
        stats, soft=binning == "soft", empty_weight=float(empty_weight),
        ignore_empty_classes=ignore_empty_classes, weight=w,
    )
    return reduce_loss(per_class, reduction)


def _check_weight(weight, num_classes: int, device: torch.device) -> torch.Tensor | None:
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32, device=device)
    if w.dim() == 0:
        w = w.expand(num_classes)
    if w.dim() != 1 or w.shape[0] != num_classes:
        raise ValueError(
            f"weight must have one entry per class used ({num_classes} after include_background), "
            f"got shape {tuple(w.shape)}"
        )
    return w


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
) -> CalibrationErrors:
    """Per-image, per-class ``CalibrationErrors(ece, ace, mce)``, each (B, C'), over hard bins, no gradient.

    NaN where an image has no (non-ignored) voxel, never a silent 0. ``include_background`` defaults to False
    like the papers' evaluation code.
    """
    _check_options(num_bins, "hard", softmax, sigmoid, ignore_index, right, to_onehot_y)
    with torch.no_grad():
        stats = _stats(
            input, target, num_bins=num_bins, binning="hard", include_background=include_background,
            to_onehot_y=to_onehot_y, softmax=softmax, sigmoid=sigmoid, ignore_index=ignore_index, right=right,
            backend=backend, validate=validate,
        )
        return calibration_errors_from_stats(stats)
