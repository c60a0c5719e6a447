"""Type and range checks of the options every public entry point shares; the one place they are written.

:func:`check_options` is called by :mod:`calibops.functional` (every call), by the loss modules and by
:class:`calibops.DatasetCalibration` (at construction). It checks only what it is given (option values,
never tensor data, so it is free and traces under ``torch.compile``) and returns the options normalised to
plain Python values, which is what the kernels' schemas take.

Rules:

- Numbers: a Python ``int``/``float``, a NumPy integer/floating scalar, or a 0-d real tensor is accepted
  wherever a number is (integer options take only integer kinds). ``bool`` is never a number here.
- Flags (``include_background``, ``to_onehot_y``, ``softmax``, ``sigmoid``, ``ignore_empty_classes``,
  ``right``, ``validate``, ``multi_rater``, ``moments``): ``bool`` or ``numpy.bool_``; anything else is a
  ``TypeError`` (``softmax="yes"`` would otherwise be truthy).
- Choices: ``binning`` in hard / soft, ``mode`` in marginal / top_label, ``reduction``, ``backend``;
  ``multi_rater=True`` needs ``to_onehot_y=True`` (it reads R integer label maps).
- Caps: ``1 <= num_bins <= 2**24`` (:data:`MAX_BINS`, the same on every backend); ``ignore_index`` within
  int64 (the label dtype's own range is checked where the labels are seen, in ``functional._prepare``).
- Wrong type: ``TypeError``; wrong value: ``ValueError``; both name the option and say what is accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
import torch

from ._backends import BACKENDS

__all__ = ["MAX_BINS", "Options", "as_bool", "as_float", "as_int", "check_options", "check_weight_values"]

#: The largest ``num_bins`` any backend accepts (the float32 bin index stays exact below 2**24).
MAX_BINS = 2**24

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BINNINGS = ("hard", "soft")
REDUCTIONS = ("mean", "sum", "none")

_UNSET: Any = object()

_NP_BOOL = (np.bool_,)


def _tensor_scalar(name: str, value: torch.Tensor, integer: bool) -> int | float:
    if value.dim() != 0:
        raise TypeError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex() or (integer and value.is_floating_point()):
        kind = "an integer" if integer else "a real number"
        raise TypeError(f"{name} must be {kind}, got a 0-d tensor of dtype {value.dtype}")
    if value.device.type == "meta":
        raise TypeError(f"{name} is a meta tensor, which has no value: pass a Python number")
    return value.item()


def as_int(name: str, value: Any) -> int:
    """``value`` as a Python int: int, NumPy integer or 0-d integer tensor (never bool); else TypeError."""
    if isinstance(value, bool) or isinstance(value, _NP_BOOL):
        raise TypeError(f"{name} must be an integer, got a bool ({value!r})")
    if isinstance(value, torch.Tensor):
        return int(_tensor_scalar(name, value, integer=True))
    if isinstance(value, numbers.Integral):  # int and every NumPy integer scalar
        return int(value)
    raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")


def as_float(name: str, value: Any) -> float:
    """``value`` as a Python float: int/float, NumPy integer/floating or 0-d real tensor (never bool)."""
    if isinstance(value, bool) or isinstance(value, _NP_BOOL):
        raise TypeError(f"{name} must be a number, got a bool ({value!r})")
    if isinstance(value, torch.Tensor):
        return float(_tensor_scalar(name, value, integer=False))
    if isinstance(value, numbers.Real):  # int, float and every NumPy integer/floating scalar
        return float(value)
    raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool: ``bool`` or ``numpy.bool_``; anything else (1, "yes", None) is a TypeError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, _NP_BOOL):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__} ({value!r})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class Options(NamedTuple):
    """The checked, normalised options (plain Python values); unset ones keep their defaults."""

    num_bins: int = 20
    binning: str = "hard"
    include_background: bool = True
    to_onehot_y: bool = False
    softmax: bool = False
    sigmoid: bool = False
    ignore_empty_classes: bool = True
    reduction: str = "mean"
    empty_weight: float = 0.01
    right: bool = False
    ignore_index: int | None = None
    backend: str = "auto"
    validate: bool = True
    mode: str = "marginal"
    multi_rater: bool = False
    moments: bool = False


_FLAGS = (
    "include_background",
    "to_onehot_y",
    "softmax",
    "sigmoid",
    "ignore_empty_classes",
    "right",
    "validate",
    "multi_rater",
    "moments",
)
MODES = ("marginal", "top_label")


def check_options(
    *,
    num_bins: Any = _UNSET,
    binning: Any = _UNSET,
    include_background: Any = _UNSET,
    to_onehot_y: Any = _UNSET,
    softmax: Any = _UNSET,
    sigmoid: Any = _UNSET,
    ignore_empty_classes: Any = _UNSET,
    reduction: Any = _UNSET,
    empty_weight: Any = _UNSET,
    right: Any = _UNSET,
    ignore_index: Any = _UNSET,
    backend: Any = _UNSET,
    validate: Any = _UNSET,
    mode: Any = _UNSET,
    multi_rater: Any = _UNSET,
    moments: Any = _UNSET,
) -> Options:
    """Check the given options (see the module docstring) and return them normalised.

    ``weight`` is checked by :func:`check_weight_values` and ``functional._check_weight`` (it needs the
    number of classes); everything else of the 14 shared options is checked here.
    """
    given = {k: v for k, v in locals().items() if v is not _UNSET}
    out: dict[str, Any] = {}
    for flag in _FLAGS:
        if flag in given:
            out[flag] = as_bool(flag, given[flag])
    if "num_bins" in given:
        m = as_int("num_bins", given["num_bins"])
        if m < 1:
            raise ValueError(f"num_bins must be >= 1, got {m}")
        if m > MAX_BINS:
            raise ValueError(f"num_bins must be <= 2**24 = {MAX_BINS} (the limit of every backend), got {m}")
        out["num_bins"] = m
    if "binning" in given:
        out["binning"] = _choice("binning", given["binning"], BINNINGS)
    if "mode" in given:
        out["mode"] = _choice("mode", given["mode"], MODES)
    if out.get("multi_rater") and not out.get("to_onehot_y", False):
        raise ValueError(
            "multi_rater=True reads R integer label maps (B, R, *spatial): pass to_onehot_y=True with them"
        )
    if "reduction" in given:
        out["reduction"] = _choice("reduction", given["reduction"], REDUCTIONS)
    if "backend" in given:
        out["backend"] = _choice("backend", given["backend"], ("auto", *BACKENDS))
    if out.get("softmax") and out.get("sigmoid"):
        raise ValueError("softmax=True and sigmoid=True are mutually exclusive: pick one activation")
    if "empty_weight" in given:
        ew = given["empty_weight"]
        try:
            ew = as_float("empty_weight", ew)
        except TypeError as exc:
            raise TypeError(f"{exc}; empty_weight must be a finite number >= 0") from None
        if not (math.isfinite(ew) and ew >= 0):
            raise ValueError(f"empty_weight must be a finite number >= 0, got {ew!r}")
        out["empty_weight"] = ew
    if "ignore_index" in given and given["ignore_index"] is not None:
        ii = given["ignore_index"]
        try:
            ii = as_int("ignore_index", ii)
        except TypeError as exc:
            raise TypeError(f"{exc}; ignore_index must be an integer label value or None") from None
        if not INT64_MIN <= ii <= INT64_MAX:
            raise ValueError(
                f"ignore_index must fit in int64 (and in the labels' dtype), got {ii}: pass the label value "
                "to leave out, e.g. 255"
            )
        out["ignore_index"] = ii
        if not out.get("to_onehot_y", False):
            raise ValueError(
                "ignore_index applies to integer label maps: pass to_onehot_y=True with labels, "
                "or drop ignore_index for one-hot/soft targets"
            )
    return Options(**out)


def check_weight_values(weight: Any) -> torch.Tensor | None:
    """Type-check ``weight`` and return it as a tensor (float32, on its own device for tensors).

    Host values (lists, tuples, numbers, NumPy arrays) are also checked for NaN/inf and negative entries
    here, for free; the values of a tensor are checked by ``functional._check_weight`` together with the
    statistics' host synchronisation (only with validation on).
    """
    if weight is None:
        return None
    if isinstance(weight, torch.Tensor):
        if weight.dtype == torch.bool or weight.is_complex():
            raise TypeError(f"weight must hold real numbers (one per class used), got a {weight.dtype} tensor")
        return weight.to(torch.float32)
    if isinstance(weight, (str, bytes)) or isinstance(weight, bool):
        raise TypeError(f"weight must be a sequence of per-class numbers or a tensor, got {type(weight).__name__}")
    try:
        w64 = torch.as_tensor(weight, dtype=torch.float64)
        kind = torch.as_tensor(weight).dtype
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"weight must be a sequence of per-class numbers or a tensor, got {type(weight).__name__} ({exc})"
        ) from None
    if kind == torch.bool or kind.is_complex:
        raise TypeError(f"weight must hold real numbers (one per class used), got {kind} values")
    if not bool(torch.isfinite(w64).all()):
        raise ValueError(f"weight must be finite (no NaN or inf), got {w64.tolist()}")
    if bool((w64 < 0).any()):
        raise ValueError(f"weight must be >= 0 (a negative class weight rewards miscalibration), got {w64.tolist()}")
    return w64.to(torch.float32)
