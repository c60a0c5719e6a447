"""Loading the compiled extension, fake kernels, and the autograd glue shared by every kernel backend.

The kernel backends (C++ CPU, CUDA C++, Triton) each provide two ops with the arguments of
docs/kernel_contract.md: a forward producing the (B, C, M) statistics and a backward producing the
gradient w.r.t. the input from the gradients of those statistics. This module attaches one autograd
formula to every such pair, so the loss epilogue (plain PyTorch on (B, C, M) tensors) differentiates
through any backend the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

__all__ = [
    "EXTENSION_ERROR",
    "extension_loaded",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "register_stats_autograd",
]

EXTENSION_ERROR: str | None = None
try:
    importlib.import_module("calibops._C")
except Exception as exc:  # noqa: BLE001 - any load failure just means "not built here"
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    """True when the compiled calibops._C extension (C++ CPU ops, maybe CUDA ops) is loaded."""
    return EXTENSION_ERROR is None


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


def _stats_fake(input, target, edges, num_bins, soft, activation, labels, ignore_index, right):
    B, C = input.shape[0], input.shape[1]
    shape = (B, C, num_bins)
    mk = lambda: input.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return mk(), mk(), mk(), input.new_empty((2,), dtype=torch.int64)  # bad: [out-of-range labels, non-finite p]


def _stats_backward_fake(
    grad_count,
    grad_sum_p,
    grad_sum_y,
    input,
    target,
    edges,
    num_bins,
    soft,
    activation,
    labels,
    ignore_index,
    right,
):
    return torch.empty_like(input)


def register_stats_autograd(forward_op: str, backward: Callable) -> None:
    """Attach the statistics autograd formula to ``forward_op`` ("calibops::name").

    ``backward`` is the callable computing ``grad_input`` from
    ``(grad_count, grad_sum_p, grad_sum_y, input, target, edges, num_bins, soft, activation, labels,
    ignore_index, right)``; every backend shares this formula and only supplies that callable.
    """

    def setup_context(ctx, inputs, output):
        input, target, edges, num_bins, soft, activation, labels, ignore_index, right = inputs
        ctx.save_for_backward(input, target, edges)
        ctx.options = (num_bins, soft, activation, labels, ignore_index, right)

    def backward_fn(ctx, grad_count, grad_sum_p, grad_sum_y, grad_bad):
        input, target, edges = ctx.saved_tensors
        num_bins, soft, activation, labels, ignore_index, right = ctx.options
        grad_input = None
        if ctx.needs_input_grad[0]:
            like = grad_sum_p if grad_sum_p is not None else grad_count
            if like is None:
                like = grad_sum_y
            zeros = None

            def dense(g):
                nonlocal zeros
                if g is not None:
                    return g.contiguous().float()
                if zeros is None:
                    zeros = like.new_zeros(like.shape, dtype=torch.float32)
                return zeros

            grad_input = backward(
                dense(grad_count),
                dense(grad_sum_p),
                dense(grad_sum_y),
                input,
                target,
                edges,
                num_bins,
                soft,
                activation,
                labels,
                ignore_index,
                right,
            )
        return grad_input, None, None, None, None, None, None, None, None

    torch.library.register_autograd(forward_op, backward_fn, setup_context=setup_context)


if extension_loaded():
    torch.library.register_fake("calibops::binned_stats")(_stats_fake)
    torch.library.register_fake("calibops::binned_stats_backward")(_stats_backward_fake)
    register_stats_autograd("calibops::binned_stats", torch.ops.calibops.binned_stats_backward)
