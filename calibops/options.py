"""One frozen :class:`Options`: every shared option's type, default and check, written once.

Public functions build one ``Options`` per call, the loss modules and :class:`calibops.DatasetCalibration` one
at construction; it is handed inward (engine, kernels) and never checked again. Checks look only at option
values, never tensor data, so they are free and trace under ``torch.compile``; values are normalised to plain
Python values, which is what the kernels' schemas take.

Rules:

- Numbers: a Python ``int``/``float``, a NumPy integer/floating scalar, or a 0-d real tensor is accepted
  wherever a number is (integer options take only integer kinds). ``bool`` is never a number here.
- Flags (``include_background``, ``to_onehot_y``, ``softmax``, ``sigmoid``, ``ignore_empty_classes``,
  ``right``, ``validate``, ``multi_rater``, ``moments``): ``bool`` or ``numpy.bool_``; anything else is a
  ``TypeError`` (``softmax="yes"`` would otherwise be truthy).
- Choices: ``binning`` in hard / soft, ``mode`` in marginal / top_label, ``reduction``, ``backend``.
- Rules between options: ``softmax`` and ``sigmoid`` exclude each other; ``multi_rater`` and ``ignore_index``
  need ``to_onehot_y=True`` (they read integer label maps); ``include_background=False`` does not apply to
  ``mode="top_label"`` and is an error there.
- Caps: ``1 <= num_bins <= 2**24`` (:data:`MAX_BINS`, the same on every backend); ``ignore_index`` within
  int64 (the label dtype's own range is checked where the labels are seen, in :mod:`calibops.engine`).
- Wrong type: ``TypeError``; wrong value: ``ValueError``; both name the option and say what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .contract import BACKENDS, MAX_BINS

__all__ = [
    "BINNINGS",
    "DEFAULTS",
    "MAX_BINS",
    "METRICS",
    "MODES",
    "REDUCTIONS",
    "Options",
    "as_bool",
    "as_float",
    "as_int",
    "check_options",
    "check_weight_values",
]


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
BINNINGS = ("hard", "soft")
REDUCTIONS = ("mean", "sum", "none")
MODES = ("marginal", "top_label")

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


#: The metric names every dataset report uses (per image and pooled), in this order.
METRICS = ("ece", "ace", "mce", "l2")


def _flag(name: str, value: Any) -> bool:
    return as_bool(name, value)


def _num_bins(name: str, value: Any) -> int:
    m = as_int(name, value)
    if m < 1:
        raise ValueError(f"{name} must be >= 1, got {m}")
    if m > MAX_BINS:
        raise ValueError(f"{name} must be <= 2**24 = {MAX_BINS} (the limit of every backend), got {m}")
    return m


def _empty_weight(name: str, value: Any) -> float:
    try:
        ew = as_float(name, value)
    except TypeError as exc:
        raise TypeError(f"{exc}; {name} must be a finite number >= 0") from None
    if not (math.isfinite(ew) and ew >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {ew!r}")
    return ew


def _ignore_index(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        ii = as_int(name, value)
    except TypeError as exc:
        raise TypeError(f"{exc}; {name} must be an integer label value or None") from None
    if not INT64_MIN <= ii <= INT64_MAX:
        raise ValueError(
            f"{name} must fit in int64 (and in the labels' dtype), got {ii}: pass the label value to leave out, "
            "e.g. 255"
        )
    return ii


def _choices(*choices: str):
    return lambda name, value: _choice(name, value, choices)


@dataclass(frozen=True)
class Options:
    """Every option the statistics, losses and metrics share: its type, default and check, written once.

    Construction checks and normalises every field (plain Python values: ``num_bins=np.int64(10)`` becomes
    ``10``) and the rules between fields; a wrong type is a ``TypeError`` and a wrong value a ``ValueError``, both
    naming the option. Public functions build one per call, the loss modules and ``DatasetCalibration`` one at
    construction; it is then handed inward and never checked again. :meth:`replace` checks the changed copy. The
    defaults below are the library's one default per option (docs/options.md).
    """

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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            checked = _CHECKS[f.name](f.name, value)
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if self.softmax and self.sigmoid:
            raise ValueError("softmax=True and sigmoid=True are mutually exclusive: pick one activation")
        if self.multi_rater and not self.to_onehot_y:
            raise ValueError(
                "multi_rater=True reads R integer label maps (B, R, *spatial): pass to_onehot_y=True with them"
            )
        if self.ignore_index is not None and not self.to_onehot_y:
            raise ValueError(
                "ignore_index applies to integer label maps: pass to_onehot_y=True with labels, "
                "or drop ignore_index for one-hot/soft targets"
            )
        if self.mode == "top_label" and not self.include_background:
            raise ValueError(
                "include_background=False does not apply to mode='top_label' (the argmax runs over every class, "
                "so no class can be dropped): leave include_background at its default True"
            )

    def replace(self, **changes: Any) -> Options:
        """A checked copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


_CHECKS: dict[str, Any] = {
    "num_bins": _num_bins,
    "binning": _choices(*BINNINGS),
    "include_background": _flag,
    "to_onehot_y": _flag,
    "softmax": _flag,
    "sigmoid": _flag,
    "ignore_empty_classes": _flag,
    "reduction": _choices(*REDUCTIONS),
    "empty_weight": _empty_weight,
    "right": _flag,
    "ignore_index": _ignore_index,
    "backend": _choices("auto", *BACKENDS),
    "validate": _flag,
    "mode": _choices(*MODES),
    "multi_rater": _flag,
    "moments": _flag,
}

#: The default of every option (the one table: docs/options.md).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Options)}


_FROM_CACHE: dict[tuple, Options] = {}
_PLAIN = (bool, int, float, str, type(None))  # immutable: a cached check can never go stale


def options_from(scope: dict[str, Any], **fixed: Any) -> Options:
    """The checked :class:`Options` of a call or constructor: the option arguments found in ``scope`` (its
    ``locals()``; other names are skipped), then ``fixed`` (which wins).

    ``Options`` is frozen and its check a pure function of the values, so the result for plain Python values
    (bool, int, float, str, None) is memoised, keyed by each value's type too (``True`` and ``1`` stay apart): a
    function called with the same options in a training loop builds and checks them once. Other values (NumPy
    scalars, 0-d tensors, which a caller could change in place) are checked on every call."""
    given = {k: v for k, v in scope.items() if k in DEFAULTS}
    given.update(fixed)
    types = tuple(map(type, given.values()))
    if not all(t in _PLAIN for t in types):
        return Options(**given)
    key = (tuple(given), types, tuple(given.values()))
    cached = _FROM_CACHE.get(key)
    if cached is None:
        cached = Options(**given)
        if len(_FROM_CACHE) < 1024:
            _FROM_CACHE[key] = cached
    return cached


def check_options(**given: Any) -> Options:
    """An :class:`Options` from the given options (unset ones keep their defaults); checks them all."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {sorted(DEFAULTS)}")
    return Options(**given)


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
