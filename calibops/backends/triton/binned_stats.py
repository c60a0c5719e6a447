"""The Triton backend's statistics ops (docs/kernel_contract.md, v2): launchers and registration.

Two ops, registered with :func:`torch.library.triton_op` so ``torch.compile(fullgraph=True)`` traces into
them, with the shared autograd formula of :mod:`calibops.backends.extension` attached to the forward:

- ``calibops::triton_binned_stats(input, target, edges, num_bins, scheme, activation, target_kind, mode, moments,
  ignore_index, right) -> (count, sum_p, sum_y, sum_p2, sum_py, bad)``
- ``calibops::triton_binned_stats_backward(grad_count, grad_sum_p, grad_sum_y, grad_sum_p2, grad_sum_py, input,
  target, edges, ...) -> grad_input``

Arguments are checked by :mod:`calibops.contract` (the same checks as the reference op and the fake kernels).
The package is split by job: :mod:`.schemes` (one membership function per binning scheme), :mod:`.tiles`
(loads, activations, targets, the contract's entries), :mod:`.kernels` (the kernels), :mod:`.launch` (block
sizes, grid, constexpr flags), and this module (launchers, registration).

Forward design (one read of input and target, label maps of all raters included), one kernel with two binning
paths that ``num_bins`` chooses at compile time (the ``SCATTER`` constexpr):

- ``num_bins <= MAX_REGISTER_BINS`` (64, the usual case): grid = (B * P, GRID_CC). Program ``(b, pn, cc)``
  walks ``tiles_per_prog`` consecutive tiles of ``BLOCK_N`` voxels of image ``b``, computes p (softmax over C /
  sigmoid fused) for its class chunk (marginal) or the confidence and predicted class over all classes
  (top-label), the membership of each entry, and accumulates a ``[K_BLOCK, M_PAD]`` register histogram per
  statistic by a loop over the bins (compare against the bin index, masked row sums: no ``tl.histogram``, no
  atomics). Each program writes its partial histograms to a float32 ``[S, B*P, K, M]`` buffer; ``torch.sum``
  over P merges them in a fixed order, so results are bitwise deterministic run to run on one device. Its cost
  per element grows with M (one masked pass per bin), which is why it is limited to small M.
- ``num_bins > MAX_REGISTER_BINS`` (scatter path, cost independent of M): the same grid and per-element
  work on small tiles (``BLOCK_N`` 8-32, ``K_BLOCK * BLOCK_N**2 <= SCATTER_PAIRS``). Within each row of a tile,
  the entries that share a bin are grouped by an all-pairs comparison (``[K_BLOCK, BLOCK_N, BLOCK_N]``,
  O(BLOCK_N) work per element whatever M is); the first entry of each group (its leader) carries the group's
  float32 sums and adds them with a plain load/add/store into the program's own float64 partial row in global
  memory (``[S, B*P, K, M]``, zero-initialised). Leaders of one row have distinct bins and programs own disjoint
  rows, so no two lanes ever update the same address at once (no atomics); ``tl.debug_barrier()`` orders one
  tile's updates before the next tile's loads. Two-bin schemes (soft) group by the lower bin and update in two
  rounds (lower bins, then upper bins), so each round writes distinct addresses too. Partial rows are summed over
  P by ``torch.sum`` in float64 and rounded once to float32: bitwise deterministic run to run. ``P <= max(1, N //
  M)`` keeps the partials within about the input's size.

Backward design (one read of input and target, one write of the gradient; cost independent of M): grid =
(B * P,); each program walks its tiles, recomputes p, the entries and their memberships, gathers the upstream
gradients at the entry's bins (cache resident for small M) and applies the contract's formula through the
memberships and the activation (top-label: dL/dq once per voxel, to the predicted class only).

Non-finite probabilities: an entry whose p is NaN or +-inf (exponent bits) is left out of every statistic (its q
is 0 before binning, so no ``0 * inf`` reaches a sum), gets gradient exactly 0 (its p is also 0 in the chain
rule) and is counted in ``bad[1]``; a top-label entry is left out when any p of its voxel is non-finite, every
non-finite p still counted. Entries of unused voxels are skipped first and not counted. ``bad[0]`` counts label
entries outside [0, C) that are not ``ignore_index`` over all raters.

Classes above the register limit (C > 32) are processed in chunks of 32. Forward marginal: one program axis per
chunk; with softmax each chunk-program also runs an online max/sum over all chunks for the normaliser (the input
is then read ``ceil(C/32)`` times, mostly from L2). Forward top-label and backward: the program loops over the
chunks (softmax: normaliser pass, then the passes that need p).

Offsets are 64-bit everywhere (image, class and rater strides are promoted to int64 before multiplying). Bin
indices are clamped before any gather, so NaN/inf inputs cannot read out of bounds.

Launching: compiled kernels go through :func:`torch.library.wrap_triton` (so torch.compile sees them inside the
``triton_op``); under ``TRITON_INTERPRET=1`` the kernels are launched directly, because ``wrap_triton`` rejects
interpreted kernels on torch <= 2.12. The interpreter also gets its integer arguments as 0-d scalar tensors
(:func:`calibops.backends.triton.launch.interpreter_scalars`): Triton <= 3.6's interpreter turns an int argument into a
one-element array and calls ``int()`` on it for ``range(C)``, which numpy >= 2.4 refuses.
"""

from __future__ import annotations

import torch
import triton
from torch.library import triton_op, wrap_triton

from ...contract import TARGET_LABELS, Geometry, OpCall, check_args, check_grads, empty_outputs, implements_op
from .. import extension as _ops
from .kernels import _stats_bwd_kernel, _stats_fwd_kernel
from .launch import flags, interpreter_scalars, launch_config

__all__ = ["INTERPRETED", "binned_stats", "binned_stats_backward"]

INTERPRETED = not isinstance(_stats_fwd_kernel, triton.runtime.JITFunction)


def _target_arg(target: torch.Tensor) -> torch.Tensor:
    target = target.contiguous()
    return target.view(torch.uint8) if target.dtype == torch.bool else target


def _launch(kernel):
    """``kernel[grid](...)`` launcher: through ``wrap_triton`` when compiled (torch.compile traces into the
    ``triton_op``); directly under the interpreter, where ``wrap_triton`` rejects the kernel on torch <= 2.12
    and there is nothing for torch.compile to see through (the op is an opaque custom op there)."""
    return kernel if INTERPRETED else wrap_triton(kernel)


def _interpreter_scalars(*values: int) -> tuple:
    """:func:`.launch.interpreter_scalars` for this process (0-d scalars only when interpreted)."""
    return interpreter_scalars(INTERPRETED, *values)


def _int_args(g: Geometry, cfg: dict, call: OpCall) -> tuple:
    """The kernels' run-time integer arguments ``C, N, P, tiles_per_prog, ignore_index, has_ignore, right``."""
    has_ignore = call.target_kind == TARGET_LABELS and call.ignore_index is not None
    ignore = int(call.ignore_index) if has_ignore else 0
    return _interpreter_scalars(g.C, g.N, cfg["P"], cfg["tiles_per_prog"], ignore, int(has_ignore), int(call.right))


@implements_op()
def _triton_binned_stats(call: OpCall) -> tuple[torch.Tensor, ...]:
    """Forward statistics ``(count, sum_p, sum_y, sum_p2, sum_py, bad)`` (docs/kernel_contract.md)."""
    g = check_args(*call)
    B, C, N, R, K, M = g
    if B * C * N == 0:  # includes C = 0: empty (marginal) or zero (top-label) statistics, nothing counted
        return tuple(o.zero_() for o in empty_outputs(call.input, g, call.moments))
    x = call.input.contiguous()
    cfg = launch_config(B, C, N, M, x.device, mode=call.mode, raters=R, moments=call.moments)
    P = cfg["P"]
    S = 2 + R + (2 if call.moments else 0)  # planes: count, sum_p, sum_y of each rater, sum_p2, sum_py
    counts = torch.empty((2, B * P * cfg["GRID_CC"]), dtype=torch.int64, device=x.device)
    # the scatter path adds into zeroed float64 partials, the register path stores float32 ones
    new = torch.zeros if cfg["SCATTER"] else torch.empty
    part = new((S, B * P, K, M), dtype=torch.float64 if cfg["SCATTER"] else torch.float32, device=x.device)
    _launch(_stats_fwd_kernel)[(B * P, cfg["GRID_CC"])](
        x,
        _target_arg(call.target),
        call.edges.contiguous(),
        part,
        counts,
        *_int_args(g, cfg, call),
        **flags(cfg, call, R),
    )
    part = part.view(S, B, P, K, M)
    # fixed-order merge over P (float64 partials of the scatter kernel are rounded once, here)
    stats = [part[s].sum(dim=1).to(torch.float32) for s in range(S)]
    count, sum_p = stats[0], stats[1]
    sum_y = torch.stack(stats[2 : 2 + R], dim=2)  # [B, K, R, M]
    if call.moments:
        sum_p2, sum_py = stats[2 + R], stats[3 + R]
    else:
        sum_p2, sum_py = (x.new_zeros((0,), dtype=torch.float32) for _ in range(2))
    return count, sum_p, sum_y, sum_p2, sum_py, counts.sum(dim=1)


@implements_op(backward=True)
def _triton_binned_stats_backward(grads: tuple[torch.Tensor, ...], call: OpCall) -> torch.Tensor:
    """Gradient w.r.t. ``input`` from the gradients of the statistics (one pass, docs/kernel_contract.md)."""
    g = check_args(*call)
    check_grads(g, call.moments, *grads)
    B, C, N, R, K, M = g
    grad = torch.empty((B, C, N), dtype=call.input.dtype, device=call.input.device)
    if B * C * N == 0:
        return grad
    x = call.input.contiguous()
    gc, gp, gy, gp2, gpy = (t.contiguous() for t in grads)
    if not call.moments:
        gp2 = gpy = gp  # unused when off
    cfg = launch_config(B, C, N, M, x.device, backward=True, mode=call.mode, raters=R, moments=call.moments)
    _launch(_stats_bwd_kernel)[(B * cfg["P"],)](
        gc,
        gp,
        gy,
        gp2,
        gpy,
        x,
        _target_arg(call.target),
        call.edges.contiguous(),
        grad,
        *_int_args(g, cfg, call),
        **flags(cfg, call, R, backward=True),
    )
    return grad


def _register(name: str, impl, fake) -> None:
    """Register ``impl`` as ``calibops::<name>`` with the fake kernel ``fake``.

    Compiled Triton (GPU): :func:`torch.library.triton_op`, so torch.compile traces into the kernels; the fake
    still checks the arguments like the real op (calibops/contract.py) when torch.compile traces with fake
    tensors. Under ``TRITON_INTERPRET=1`` the kernels are plain Python functions that ``wrap_triton`` cannot trace
    (it would run them on fake tensors), so the same implementation is registered as an opaque
    :func:`torch.library.custom_op` with that fake kernel instead: identical schema and results, and torch.compile
    / opcheck still work on CPU tensors in tests."""
    if INTERPRETED:
        op = torch.library.custom_op(f"calibops::{name}", impl, mutates_args=())
        op.register_fake(fake)
    else:
        triton_op(f"calibops::{name}", impl, mutates_args=())


_register("triton_binned_stats", _triton_binned_stats, _ops.stats_fake)
_register("triton_binned_stats_backward", _triton_binned_stats_backward, _ops.stats_backward_fake)
binned_stats = torch.ops.calibops.triton_binned_stats
binned_stats_backward = torch.ops.calibops.triton_binned_stats_backward
_ops.register_stats_autograd("calibops::triton_binned_stats", binned_stats_backward)
