"""The kernel contract's argument checks and output shapes, written once for Python (docs/kernel_contract.md).

Used by the reference op (:func:`calibops.reference.binned_stats_prepared`), the fake kernels
(``calibops/backends/extension.py``) and the Triton launcher, so every Python-side implementation of the two ops
accepts and rejects exactly the same arguments and produces the same shapes. The C++ bindings use
``csrc/contract.h``, which states the same rules; the engine (``calibops/engine.py``) checks user-facing
arguments before any op runs, so these checks guard the op boundary itself (direct ``torch.ops`` calls, wrong
glue code). Also the one definition of the backend names, the bin cap and the dtypes each op reads.
"""

from __future__ import annotations

import functools
import inspect
from collections import namedtuple
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

__all__ = [
    "ACT_NONE",
    "BACKENDS",
    "ACT_SIGMOID",
    "ACT_SOFTMAX",
    "DENSE_DTYPES",
    "INPUT_DTYPES",
    "LABEL_DTYPES",
    "MAX_BINS",
    "MODE_MARGINAL",
    "MODE_TOP_LABEL",
    "SCHEMES",
    "SCHEME_HARD",
    "SCHEME_SOFT",
    "TARGET_DENSE",
    "TARGET_LABELS",
    "Geometry",
    "GRAD_NAMES",
    "OpCall",
    "check_args",
    "check_grads",
    "empty_outputs",
    "implements_op",
    "op_signature",
]

#: Every backend name (``backend=`` in the API, besides ``"auto"``).
BACKENDS = ("reference", "cpu", "cuda", "triton")

ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID = 0, 1, 2
SCHEME_HARD, SCHEME_SOFT = 0, 1
#: Public binning names -> scheme ids (``binning=`` in the API).
SCHEMES = {"hard": SCHEME_HARD, "soft": SCHEME_SOFT}
TARGET_LABELS, TARGET_DENSE = 0, 1
MODE_MARGINAL, MODE_TOP_LABEL = 0, 1
#: Public mode names -> mode ids (``mode=`` in the API).
MODES = {"marginal": MODE_MARGINAL, "top_label": MODE_TOP_LABEL}
MAX_BINS = 2**24

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)


class Geometry(NamedTuple):
    """Sizes of one op call: images B, classes C, voxels N, raters R, statistic rows K, bins M."""

    B: int
    C: int
    N: int
    R: int
    K: int
    M: int

    def stat_shape(self) -> tuple[int, int, int]:
        return (self.B, self.K, self.M)

    def sum_y_shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.K, self.R, self.M)


def _int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return v


#: The arguments of a statistics op call, in the schema's order (docs/kernel_contract.md): input [B, C, N], target
#: [B, R, N] labels or [B, C, N] dense, edges [M + 1] hard edges or [M] soft centres, then the scalars.
OpCall = namedtuple(
    "OpCall", "input target edges num_bins scheme activation target_kind mode moments ignore_index right"
)
#: The backward op's leading arguments (then the forward's :data:`OpCall`): the gradients of the five statistics.
GRAD_NAMES = ("grad_count", "grad_sum_p", "grad_sum_y", "grad_sum_p2", "grad_sum_py")
# Each argument's type in the op schema: tensors, then ints, except for these.
_TYPES = {"moments": bool, "ignore_index": Optional[int], "right": bool}  # noqa: UP045 - torch 2.6 schema inference


def op_signature(backward: bool = False) -> inspect.Signature:
    """The Python signature of the forward op (``backward``: the backward op), built from :data:`OpCall`.

    Forward: ``(input, target, edges, num_bins, ..., right) -> (count, sum_p, sum_y, sum_p2, sum_py, bad)``;
    backward: the :data:`GRAD_NAMES` first, then the same, ``-> grad_input``. ``torch.library`` infers an op's
    schema from this signature (:func:`implements_op`)."""
    names = (GRAD_NAMES if backward else ()) + OpCall._fields
    tensors = set(GRAD_NAMES + OpCall._fields[:3])
    params = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=torch.Tensor if name in tensors else _TYPES.get(name, int),
        )
        for name in names
    ]
    returns = torch.Tensor if backward else tuple[(torch.Tensor,) * 6]
    return inspect.Signature(params, return_annotation=returns)


def implements_op(backward: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(call)`` (``backward``: ``fn(grads, call)``), which takes the op's arguments as one
    :data:`OpCall` (after the tuple of the five gradients), becomes a function with the op's own signature
    (:func:`op_signature`): positional or keyword arguments are gathered into the :data:`OpCall`.

    The signature is what ``torch.library.custom_op`` and ``triton_op`` infer the op schema from (``triton_op``
    ignores an explicit ``schema=`` up to at least torch 2.13), so the argument list is written once, here; the
    result's ``__wrapped__`` is ``fn`` (``triton_op`` finds the Triton kernels in its source)."""
    sig = op_signature(backward)
    n_grads = len(GRAD_NAMES) if backward else 0
    size = len(sig.parameters)

    def decorate(fn: Callable) -> Callable:
        def op(*args, **kwargs):
            if kwargs or len(args) != size:
                args = sig.bind(*args, **kwargs).args  # a TypeError naming the missing / unexpected argument
            call = OpCall._make(args[n_grads:])
            return fn(args[:n_grads], call) if backward else fn(call)

        functools.update_wrapper(op, fn)
        op.__signature__ = sig
        return op

    return decorate


def check_args(*call: object, allow_float64: bool = False) -> Geometry:
    """Check the forward op's arguments (docs/kernel_contract.md) and return the call's :class:`Geometry`.

    Raises ``TypeError`` / ``ValueError`` naming the argument. Strides are not checked: every implementation
    accepts any strides. ``allow_float64``: the reference also takes float64 input (and a float64 dense target).
    ``call``: the op's arguments (:data:`OpCall`).
    """
    input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index, right = OpCall(*call)
    M = _int("num_bins", num_bins)
    if not 1 <= M <= MAX_BINS:
        raise ValueError(f"num_bins must be in [1, 2**24], got {M}")
    if _int("scheme", scheme) not in (SCHEME_HARD, SCHEME_SOFT):
        raise ValueError(f"scheme must be 0 (hard) or 1 (soft), got {scheme}")
    if _int("activation", activation) not in (ACT_NONE, ACT_SOFTMAX, ACT_SIGMOID):
        raise ValueError(f"activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got {activation}")
    if _int("target_kind", target_kind) not in (TARGET_LABELS, TARGET_DENSE):
        raise ValueError(f"target_kind must be 0 (labels) or 1 (dense), got {target_kind}")
    if _int("mode", mode) not in (MODE_MARGINAL, MODE_TOP_LABEL):
        raise ValueError(f"mode must be 0 (marginal) or 1 (top-label), got {mode}")
    if ignore_index is not None:
        _int("ignore_index", ignore_index)
    if input.dim() != 3:
        raise ValueError(f"input must be [B, C, N], got shape {tuple(input.shape)}")
    in_dtypes = INPUT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if input.dtype not in in_dtypes:
        raise TypeError(f"input must be float32, float16 or bfloat16, got {input.dtype}")
    B, C, N = (int(s) for s in input.shape)
    for name, t in (("target", target), ("edges", edges)):
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if target_kind == TARGET_LABELS:
        if target.dim() != 3 or target.shape[0] != B or target.shape[2] != N or target.shape[1] < 1:
            raise ValueError(f"target (labels) must be [B, R, N] = [{B}, R >= 1, {N}], got {tuple(target.shape)}")
        if target.dtype not in LABEL_DTYPES:
            raise TypeError(f"target (labels) must be uint8, int8, int16, int32 or int64, got {target.dtype}")
        R = int(target.shape[1])
    else:
        if tuple(target.shape) != (B, C, N):
            raise ValueError(f"target (dense) must be [B, C, N] = {[B, C, N]}, got {tuple(target.shape)}")
        dense = DENSE_DTYPES + ((torch.float64,) if allow_float64 else ())
        if target.dtype not in dense:
            raise TypeError(f"target (dense) must be float32, float16, bfloat16, bool or uint8, got {target.dtype}")
        R = 1
    n_edges = M if scheme == SCHEME_SOFT else M + 1
    if edges.dtype != torch.float32 or edges.dim() != 1 or edges.shape[0] != n_edges:
        what = "M centres" if scheme == SCHEME_SOFT else "M + 1 edges"
        raise ValueError(
            f"edges must be float32 of shape [{n_edges}] ({what} for num_bins={M}), "
            f"got {edges.dtype} {tuple(edges.shape)}"
        )
    K = C if mode == MODE_MARGINAL else 1
    return Geometry(B, C, N, R, K, M)


def check_grads(
    g: Geometry,
    moments: bool,
    grad_count: torch.Tensor,
    grad_sum_p: torch.Tensor,
    grad_sum_y: torch.Tensor,
    grad_sum_p2: torch.Tensor,
    grad_sum_py: torch.Tensor,
) -> None:
    """Check the backward op's gradient arguments against the forward outputs' shapes (float32)."""
    stat = g.stat_shape()
    mom = stat if moments else (0,)
    for name, t, shape in (
        ("grad_count", grad_count, stat),
        ("grad_sum_p", grad_sum_p, stat),
        ("grad_sum_y", grad_sum_y, g.sum_y_shape()),
        ("grad_sum_p2", grad_sum_p2, mom),
        ("grad_sum_py", grad_sum_py, mom),
    ):
        if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must be float32 of shape {list(shape)}, got {t.dtype} {tuple(t.shape)}")


def empty_outputs(
    input: torch.Tensor, g: Geometry, moments: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    """Uninitialised outputs of the forward op with the contract's shapes (fake kernels, launchers)."""
    stat = g.stat_shape()
    mom = stat if moments else (0,)
    return (
        input.new_empty(stat, dtype=dtype),
        input.new_empty(stat, dtype=dtype),
        input.new_empty(g.sum_y_shape(), dtype=dtype),
        input.new_empty(mom, dtype=dtype),
        input.new_empty(mom, dtype=dtype),
        input.new_empty((2,), dtype=torch.int64),
    )
