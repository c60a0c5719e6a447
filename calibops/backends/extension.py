"""Loading the compiled extension, fake kernels, and the autograd glue shared by every kernel backend.

The kernel backends (C++ CPU, CUDA C++, Triton) each provide two ops with the arguments of
docs/kernel_contract.md (v2): a forward producing the (B, K, M) statistics and a backward producing the
gradient w.r.t. the input from the gradients of those statistics. This module attaches one autograd
formula to every such pair, so the loss epilogue (plain PyTorch on (B, C, M) tensors) differentiates
through any backend the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from ..contract import check_args, check_grads, empty_outputs

__all__ = [
    "EXTENSION_ERROR",
    "extension_loaded",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "eager_autograd",
    "stats_backward",
    "register_stats_autograd",
    "stats_backward_fake",
    "stats_fake",
]

EXTENSION_ERROR: str | None = None
try:
    importlib.import_module("calibops._C")
except Exception as exc:  # noqa: BLE001 - any load failure just means "not built here"
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


def missing_extension_message(error: str | None, build_failure: str | None, built: bool) -> str | None:
    """The warning given at import when the compiled ops are missing although they were meant to be there:
    setup.py recorded a failed build (``build_failure``), or a built ``_C`` file does not load; else None."""
    if error is None or (build_failure is None and not built):
        return None  # loaded, or never built (CALIBOPS_NO_EXT=1, a source checkout): nothing to say
    why = (
        f"the build failed: {build_failure}"
        if build_failure is not None
        else f"it was built but fails to load: {error}"
    )
    return (
        f"calibops: the compiled C++/CUDA ops are NOT available ({why}). Everything runs on the pure-PyTorch "
        "reference backend, about 10x slower. Reinstall with `pip install --no-build-isolation -v -e .` to see the "
        "compiler output (CALIBOPS_REQUIRE_EXT=1 turns a failed build into an error); `python -m calibops` lists "
        "the backends."
    )


def _warn_if_extension_missing() -> None:
    import os
    import warnings

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # calibops/, where _C is built
    marker = os.path.join(here, "_build_failed.txt")
    try:
        failure = None
        if os.path.exists(marker):
            with open(marker) as f:
                failure = f.read().strip() or "see the pip log"
        built = any(f.startswith("_C.") and f.endswith((".so", ".pyd")) for f in os.listdir(here))
    except OSError:
        return
    msg = missing_extension_message(EXTENSION_ERROR, failure, built)
    if msg is not None:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def extension_loaded() -> bool:
    """True when the compiled calibops._C extension (C++ CPU ops, maybe CUDA ops) is loaded."""
    return EXTENSION_ERROR is None


#: The op schema this Python code speaks (docs/kernel_contract.md, v2). An extension built from an older source
#: registers ``calibops::binned_stats`` without these arguments: it is then treated as not built (a stale build).
_V2_ARGS = ("scheme", "target_kind", "mode", "moments")


def _stale_schema() -> str | None:
    try:
        schema = torch.ops.calibops.binned_stats.default._schema
    except (AttributeError, RuntimeError):
        return "calibops._C registered no calibops::binned_stats op"
    names = {a.name for a in schema.arguments}
    if not all(n in names for n in _V2_ARGS):
        return (
            "calibops._C was built from an older source (its calibops::binned_stats op lacks the v2 arguments "
            f"{', '.join(_V2_ARGS)}): rebuild it with `pip install --no-build-isolation -e .` or "
            "`python setup.py build_ext --inplace`"
        )
    return None


if EXTENSION_ERROR is None:
    EXTENSION_ERROR = _stale_schema()

_warn_if_extension_missing()  # after every reason to set EXTENSION_ERROR


def _has_kernel(key: str) -> bool:
    if not extension_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("calibops::binned_stats", key)


# Decided once at import, so backend resolution is plain Python that torch.compile traces without breaks.
HAS_CPU_KERNELS: bool = _has_kernel("CPU")
HAS_CUDA_KERNELS: bool = _has_kernel("CUDA")


def has_cuda_kernels() -> bool:
    """True when the loaded extension registered CUDA implementations of the calibops ops."""
    return HAS_CUDA_KERNELS


def has_cpu_kernels() -> bool:
    """True when the loaded extension registered CPU implementations of the calibops ops."""
    return HAS_CPU_KERNELS


def stats_fake(*call):
    """Fake (meta) forward of every backend's statistics op (``call``: :data:`calibops.contract.OpCall`): checks its
    arguments like the real kernels (calibops/contract.py) and returns outputs of the contract's shapes."""
    g = check_args(*call)
    return empty_outputs(call[0], g, call[8])


def stats_backward_fake(*args):
    """Fake (meta) backward (``args``: the five statistics' gradients, then the forward's :data:`OpCall`): the
    forward's argument checks, the gradients' shapes, and a gradient like input."""
    grads, call = args[:5], args[5:]
    g = check_args(*call)
    check_grads(g, call[8], *grads)
    return torch.empty_like(call[0], memory_format=torch.contiguous_format)


def _setup(ctx, input, target, edges, options, outputs) -> None:
    ctx.save_for_backward(input, target, edges)
    ctx.options = tuple(options)
    ctx.shapes = tuple(o.shape for o in outputs[:5])


def stats_backward(
    backward: Callable, grads: tuple, shapes: tuple, input: torch.Tensor, target: torch.Tensor, edges, options
) -> torch.Tensor:
    """The one statistics autograd formula: ``backward`` (a backend's backward op) applied to the gradients of
    the five statistics (``shapes``: theirs), zeros of their shape for those that got none."""
    full = []
    for gr, shape in zip(grads, shapes):
        if gr is None:
            gr = input.new_zeros(shape, dtype=torch.float32)
        full.append(gr.contiguous().float())
    return backward(*full, input, target, edges, *options)


def _grad_input(ctx, needed: bool, backward: Callable, grads: tuple) -> torch.Tensor | None:
    """:func:`stats_backward` for an autograd context saved by :func:`_setup` (``None`` unless the input
    ``needed`` a gradient)."""
    if not needed:
        return None
    input, target, edges = ctx.saved_tensors
    return stats_backward(backward, grads, ctx.shapes, input, target, edges, ctx.options)


def register_stats_autograd(forward_op: str, backward: Callable) -> None:
    """Attach the statistics autograd formula to ``forward_op`` ("calibops::name").

    ``backward`` is the callable computing ``grad_input`` from ``(grad_count, grad_sum_p, grad_sum_y, grad_sum_p2,
    grad_sum_py, input, target, edges, num_bins, scheme, activation, target_kind, mode, moments, ignore_index,
    right)``; every backend shares this formula and only supplies that callable. Outputs that got no gradient are
    passed as zeros of their shape.
    """

    def setup_context(ctx, inputs, output):
        input, target, edges, *options = inputs
        _setup(ctx, input, target, edges, options, output)

    def backward_fn(ctx, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, grad_bad):
        grads = (grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py)
        return (_grad_input(ctx, ctx.needs_input_grad[0], backward, grads),) + (None,) * 10

    torch.library.register_autograd(forward_op, backward_fn, setup_context=setup_context)


class _EagerStats(torch.autograd.Function):
    """The same autograd formula as :func:`register_stats_autograd`, as one Python Function for eager calls:
    torch.library's per-call autograd wrapper costs about as much as the kernel itself on small inputs (~60 µs
    of a ~500 µs loss forward+backward at 1x4x16^3 on a 2-core CPU). Compiled graphs use the registered formula."""

    @staticmethod
    def forward(ctx, forward_op, backward_op, input, target, edges, *options):
        outputs = forward_op(input, target, edges, *options)
        _setup(ctx, input, target, edges, options, outputs)
        ctx.backward_op = backward_op
        ctx.mark_non_differentiable(outputs[5])
        return outputs

    @staticmethod
    def backward(ctx, grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, grad_bad):
        grads = (grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py)
        # this Function's first two arguments are the ops: the input's flag is needs_input_grad[2]
        grad = _grad_input(ctx, ctx.needs_input_grad[2], ctx.backward_op, grads)
        return (None, None, grad) + (None,) * 10


def eager_autograd(forward_op: Callable, backward_op: Callable) -> Callable:
    """``forward_op`` with the statistics autograd formula, through :class:`_EagerStats` in eager mode when the
    input needs a gradient, through the op (and its registered formula) otherwise and while compiling. The
    result carries ``forward_op`` and ``backward_op`` as attributes (the fused eager loss of
    :mod:`calibops.engine` calls them directly)."""

    def stats(input, target, edges, *options):
        if input.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _EagerStats.apply(forward_op, backward_op, input, target, edges, *options)
        return forward_op(input, target, edges, *options)

    stats.__doc__ = f"{forward_op} with the statistics autograd formula (eager: one autograd.Function)."
    stats.forward_op = forward_op  # type: ignore[attr-defined]
    stats.backward_op = backward_op  # type: ignore[attr-defined]
    return stats


if extension_loaded():
    torch.library.register_fake("calibops::binned_stats")(stats_fake)
    torch.library.register_fake("calibops::binned_stats_backward")(stats_backward_fake)
    register_stats_autograd("calibops::binned_stats", torch.ops.calibops.binned_stats_backward)
