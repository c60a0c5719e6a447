"""Triton kernels for the calibops statistics ops (docs/kernel_contract.md).

Two ops, registered with :func:`torch.library.triton_op` so ``torch.compile(fullgraph=True)`` traces into
them, with the shared autograd formula of :mod:`calibops._ops` attached to the forward:

- ``calibops::triton_binned_stats(input, target, edges, num_bins, soft, activation, labels, ignore_index,
  right) -> (count, sum_p, sum_y, bad)``
- ``calibops::triton_binned_stats_backward(grad_count, grad_sum_p, grad_sum_y, input, target, edges, ...)
  -> grad_input``

Forward design (one read of input and target), two kernels chosen by ``num_bins``:

- ``num_bins <= MAX_REGISTER_BINS`` (64, the usual case): grid = (B * P, NUM_CC). Program ``(b, pn, cc)``
  walks ``tiles_per_prog`` consecutive ``[C_BLOCK, BLOCK_N]`` tiles of image ``b`` (classes ``cc*C_BLOCK ...``),
  computes p (softmax over C / sigmoid fused), the bin index (hard) or the two bins and weights (soft) per
  element, and accumulates a ``[C_BLOCK, M_PAD]`` register histogram per statistic by a loop over the bins
  (compare against the bin index, masked row sums: no ``tl.histogram``, no atomics). Each program writes its
  partial histograms to a float32 ``[3, B*P, C, M]`` buffer; ``torch.sum`` over P merges them in a fixed
  order, so results are bitwise deterministic run to run on one device. Its cost per element grows with M
  (one masked pass per bin), which is why it is limited to small M.
- ``num_bins > MAX_REGISTER_BINS`` (scatter kernel, cost independent of M): the same grid and per-element
  work on small ``[C_BLOCK, BLOCK_N]`` tiles (``BLOCK_N`` 8-32, ``C_BLOCK * BLOCK_N**2 <= SCATTER_PAIRS``).
  Within each class row of a tile, the elements that share a bin are grouped by an all-pairs comparison
  (``[C_BLOCK, BLOCK_N, BLOCK_N]``, O(BLOCK_N) work per element whatever M is); the first element of each
  group (its leader) carries the group's float32 sums and adds them with a plain load/add/store into the
  program's own float64 partial row in global memory (``[3, B*P, C, M]``, zero-initialised). Leaders of one
  row have distinct bins and programs own disjoint rows, so no two lanes ever update the same address at
  once (no atomics); ``tl.debug_barrier()`` orders one tile's updates before the next tile's loads. Soft
  binning groups by the lower bin and updates in two rounds (lower bins, then upper bins), so each round
  writes distinct addresses too. Partial rows are summed over P by ``torch.sum`` in float64 and rounded once
  to float32: bitwise deterministic run to run. Cost: O(BLOCK_N) per element plus the ``3*B*P*C*M`` partial
  rows, with ``P <= max(1, N // M)`` so the partials stay within about the input's size (an image with
  ``N < M`` voxels gets one program per class chunk, and the cost is that of writing the (B, C, M) output).

Backward design (one read of input and target, one write of the gradient; cost independent of M): grid =
(B * P,); each program walks its tiles, recomputes p and the bins, gathers the (B, C, M) upstream gradients at
the element's bins (cache resident for small M) and applies the contract's chain rule through the memberships
and the activation.

Non-finite probabilities (docs/kernel_contract.md): an entry whose p (after the activation) is NaN or +-inf
is left out of every statistic (its p is replaced by 0 before binning, so no ``0 * inf`` reaches a sum),
gets gradient exactly 0 (its p is also 0 in the softmax/sigmoid chain rule) and is counted in ``bad[1]``;
entries of ignored voxels and of voxels with out-of-range labels are skipped first and not counted there.
``bad`` is an int64 tensor of shape (2,): ``[out-of-range labels, non-finite entries]``.

Block-size heuristic (documented, no autotuning so runs are reproducible and the interpreter stays fast). The
numbers come from compiling the kernels for sm_90 with this Triton (ptxas register counts, no GPU needed):
    - ``C_BLOCK = next_pow2(C)`` up to ``MAX_C_BLOCK = 32``: up to 32 classes live in one register tile.
    - Forward: tiles of ``C_BLOCK x BLOCK_N`` = 1024 elements (C_BLOCK <= 8) or 512 (16-32 classes), 4 warps:
      8 or 4 elements per thread, 56-152 registers and no spills for C <= 32 (bigger tiles reached 255
      registers and spilled). The per-bin loop is a runtime loop (an unrolled one spilled and compiled 30x
      slower). Programs: ~``PROGRAMS_PER_SM = 32`` per SM over the grid, each >= 4 and <= 256 tiles (the upper
      bound limits the sequential float32 accumulation length).
    - Scatter forward (M > 64): ``BLOCK_N = prev_pow2(sqrt(SCATTER_PAIRS / C_BLOCK))`` clamped to [8, 32]
      (2048 pairs: 32-152 registers for C <= 40 with Triton 3.6, no spills; 4096 pairs took 161-168 at 16
      classes and 64 lanes for one class ~250), 4 warps; partial rows accumulate in float64, so tiles per
      program need no upper bound. Where the register kernel stops paying (M = 64 here) waits for GPU timing.
    - Backward: 1024-element tiles, 8 warps (4 elements per thread, 45-80 registers), one tile per program.
    - ``BLOCK_N`` is clamped to [16, 1024] (and, under the interpreter only, to next_pow2(N)).
    The environment variables ``CALIBOPS_TRITON_TILE_FWD`` / ``CALIBOPS_TRITON_TILE_BWD`` (powers of two
    >= 16) and ``CALIBOPS_TRITON_WARPS_FWD`` / ``CALIBOPS_TRITON_WARPS_BWD`` override the heuristic for
    experiments (``bench_gpu.py --sweep-tiles`` times a few settings; the bench prints registers/spills), and
    ``CALIBOPS_TRITON_MAX_REGISTER_BINS`` (0-1024) moves the switch to the scatter kernel (0: always scatter).
    Results do not depend on them beyond float32 summation order.

Classes above the register limit (C > 32) are still exact: the classes are processed in chunks of 32.
Forward: one program axis per chunk; with softmax each chunk-program also runs an online max/sum over all
chunks for the normaliser (the input is then read ``ceil(C/32)`` times, mostly from L2). Backward: the
program loops over chunks (softmax: normaliser pass, dot-product pass, write pass).

Offsets are 64-bit everywhere (image and class strides are promoted to int64 before multiplying), so inputs
with more than 2^31 elements are addressed correctly. Bin indices are clamped before any gather, so NaN/inf
inputs cannot read out of bounds.

Launching: compiled kernels go through :func:`torch.library.wrap_triton` (so torch.compile sees them inside the
``triton_op``); under ``TRITON_INTERPRET=1`` the kernels are launched directly, because ``wrap_triton`` rejects
interpreted kernels on torch <= 2.12. The interpreter also gets its integer arguments as 0-d scalar tensors
(``_interpreter_scalars``): Triton <= 3.6's interpreter turns an int argument into a one-element array and calls
``int()`` on it for ``range(C)``, which numpy >= 2.4 refuses.
"""

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import _ops

__all__ = ["MAX_C_BLOCK", "MAX_REGISTER_BINS", "binned_stats", "binned_stats_backward", "launch_config"]

MAX_C_BLOCK = 32
MAX_TILES_PER_PROG = 256
MIN_TILES_PER_PROG = 4
PROGRAMS_PER_SM = 32
MAX_BLOCK_N = 1024  # the forward's packed (count, sum_y) tile sums rely on BLOCK_N <= 1024 < _PACK
MAX_NUM_BINS = 2**24  # the project-wide cap on num_bins
MAX_REGISTER_BINS = 64  # num_bins above this use the scatter kernel (cost independent of num_bins)
SCATTER_PAIRS = 2048  # scatter kernel: C_BLOCK * BLOCK_N**2 all-pairs comparisons per tile (<= 152 registers)
SCATTER_MAX_N = 32  # scatter kernel: widest tile (64 lanes for one class took ~250 registers on sm_90)
_PACK = tl.constexpr(2048.0)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8)
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _is_finite(p):
    """True where p is neither NaN nor +-inf (the contract's non-finite rule)."""
    return tl.abs(p) < float("inf")


@triton.jit
def _load_x(x_img, c, n, cmask, nmask, N):
    """Input tile [C_BLOCK, BLOCK_N] as float32 (0 outside the masks)."""
    offs = c[:, None].to(tl.int64) * N + n[None, :]
    return tl.load(x_img + offs, mask=cmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _softmax_norm(x_img, n, nmask, C, N, C_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-voxel max and sum(exp(x - max)) over all C classes, online over class chunks ([BLOCK_N] each)."""
    mx = tl.full([BLOCK_N], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, C_BLOCK):
        c = c0 + tl.arange(0, C_BLOCK)
        cmask = c < C
        x = _load_x(x_img, c, n, cmask, nmask, N)
        x = tl.where(cmask[:, None], x, float("-inf"))
        new_mx = tl.maximum(mx, tl.max(x, axis=0))
        # shift by 0 while every logit so far is -inf (a chunk of -inf logits must not make the sum NaN);
        # a +inf or NaN logit still makes it NaN, so every p of that voxel is NaN (the non-finite rule)
        shift = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        den = den * tl.exp(mx - shift) + tl.sum(tl.exp(x - shift[None, :]), axis=0)
        mx = new_mx
    return mx, den


@triton.jit
def _probs(x, cmask, mx, den, ACTIVATION: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """p from the float32 tile x: identity (0), softmax over dim 0 (1), sigmoid (2).

    With SINGLE_CHUNK the softmax normaliser is computed from the tile itself (mx, den unused)."""
    if ACTIVATION == 1:
        xs = tl.where(cmask[:, None], x, float("-inf"))
        if SINGLE_CHUNK:
            e = tl.exp(xs - tl.max(xs, axis=0)[None, :])
            p = e / tl.sum(e, axis=0)[None, :]
        else:
            p = tl.exp(xs - mx[None, :]) / den[None, :]
    elif ACTIVATION == 2:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        p = x
    return p


@triton.jit
def _target(t_ptr, b64, c, n, cmask, nmask, C, N, ignore_index, has_ignore, LABELS: tl.constexpr):
    """(y [C_BLOCK, BLOCK_N] float32, keep [BLOCK_N] voxel used, bad [BLOCK_N] out-of-range label)."""
    if LABELS:
        lab = tl.load(t_ptr + b64 * N + n, mask=nmask, other=0).to(tl.int64)
        in_range = (lab >= 0) & (lab < C)
        # (a runtime flag broadcast as a tensor: scalar-bool & tensor-bool masks break the interpreter)
        ignored = (lab == ignore_index) & ((tl.zeros_like(lab) + has_ignore) != 0)
        keep = nmask & in_range & (~ignored)
        bad = nmask & (~in_range) & (~ignored)
        y = (lab[None, :] == c[:, None].to(tl.int64)).to(tl.float32)
    else:
        offs = (b64 * C + c[:, None].to(tl.int64)) * N + n[None, :]
        y = tl.load(t_ptr + offs, mask=cmask[:, None] & nmask[None, :], other=0).to(tl.float32)
        keep = nmask
        bad = nmask & (n != n)
    return y, keep, bad


@triton.jit
def _hard_bin(p, e_ptr, right, NUM_BINS: tl.constexpr):
    """Hard bin j in [0, M-1] (== bucketize(p, e[1:], right).clamp(max=M-1)): estimate, correct one step."""
    q = p * NUM_BINS
    q = tl.where(q > 0.0, q, 0.0)  # NaN -> 0
    q = tl.where(q < NUM_BINS - 1, q, NUM_BINS - 1)
    j0 = q.to(tl.int32)
    e_lo = tl.load(e_ptr + j0)
    e_hi = tl.load(e_ptr + j0 + 1)
    # right=False: j = #{k : e_k < p}, so step down when p <= e[j0], up when p > e[j0+1]; right=True: < and >=
    is_right = (tl.zeros_like(j0) + right) != 0
    down = (p < e_lo) | ((~is_right) & (p == e_lo))
    up = (p > e_hi) | (is_right & (p == e_hi))
    j = j0 - (down & (j0 > 0)).to(tl.int32) + up.to(tl.int32)
    return tl.minimum(tl.maximum(j, 0), NUM_BINS - 1)


@triton.jit
def _soft_bins(p, e_ptr, NUM_BINS: tl.constexpr):
    """Soft memberships: (lo, w_lo, w_hi, slope); bin lo+1 gets w_hi, dw_lo/dp = -slope, dw_hi/dp = +slope.

    t = #{k : c_k < p} - 1 in -1..M-1; lo = clamp(t, 0, M-2); interior (0 <= t < M-1):
    w_lo = (c[lo+1] - p) / (c[lo+1] - c[lo]); t = -1: w_lo = 1; t = M-1: w_lo = 0; w_hi = 1 - w_lo.
    With M == 1 everything goes to bin 0 (w_hi = 0 and bin 1 does not exist)."""
    if NUM_BINS == 1:
        lo = tl.zeros(p.shape, tl.int32)
        w_lo = tl.full(p.shape, 1.0, tl.float32)
        w_hi = tl.zeros(p.shape, tl.float32)
        slope = tl.zeros(p.shape, tl.float32)
    else:
        # u = #{k : c_k < p}; c_k ~ (k + 1/2)/M, so u ~ floor(p*M + 1/2); correct by one step.
        q = p * NUM_BINS + 0.5
        q = tl.where(q > 0.0, q, 0.0)  # NaN -> 0
        q = tl.where(q < NUM_BINS, q, NUM_BINS)
        u0 = q.to(tl.int32)
        c_below = tl.load(e_ptr + tl.maximum(u0 - 1, 0))
        c_at = tl.load(e_ptr + tl.minimum(u0, NUM_BINS - 1))
        dec = (u0 > 0) & (~(c_below < p))
        inc = (u0 < NUM_BINS) & (c_at < p)
        t = u0 - dec.to(tl.int32) + inc.to(tl.int32) - 1
        t = tl.minimum(tl.maximum(t, -1), NUM_BINS - 1)
        lo = tl.minimum(tl.maximum(t, 0), NUM_BINS - 2)
        c_lo = tl.load(e_ptr + lo)
        c_hi = tl.load(e_ptr + lo + 1)
        d = c_hi - c_lo
        interior = (t >= 0) & (t < NUM_BINS - 1)
        w_in = (c_hi - p) / d
        w_lo = tl.where(interior, w_in, tl.where(t < 0, 1.0, 0.0))
        w_hi = 1.0 - w_lo
        slope = tl.where(interior, 1.0 / d, 0.0)
    return lo, w_lo, w_hi, slope


@triton.jit
def _tile_probs(
    x_img,
    t_ptr,
    b64,
    c,
    cmask,
    n,
    nmask,
    C,
    N,
    ignore_index,
    has_ignore,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """One [C_BLOCK, BLOCK_N] tile: (p, y, valid, bad, nonfinite).

    ``valid``: the entry enters the statistics (class and voxel in range, voxel used, p finite); ``p`` is 0
    where it does not. ``bad`` [BLOCK_N]: out-of-range labels; ``nonfinite`` [BLOCK_N]: entries of used voxels
    whose p is NaN or +-inf."""
    x = _load_x(x_img, c, n, cmask, nmask, N)
    mx = tl.zeros([BLOCK_N], tl.float32)
    den = mx
    if ACTIVATION == 1:
        if SINGLE_CHUNK:
            pass  # the tile holds every class: _probs normalises it directly
        else:
            mx, den = _softmax_norm(x_img, n, nmask, C, N, C_BLOCK, BLOCK_N)
    p = _probs(x, cmask, mx, den, ACTIVATION, SINGLE_CHUNK)
    y, keep, bad = _target(t_ptr, b64, c, n, cmask, nmask, C, N, ignore_index, has_ignore, LABELS)
    used = cmask[:, None] & keep[None, :]
    finite = _is_finite(p)
    valid = used & finite
    nonfinite = tl.sum((used & (~finite)).to(tl.int32), axis=0)
    p = tl.where(valid, p, 0.0)
    return p, y, valid, bad, nonfinite


@triton.jit
def _store_counts(cnt_ptr, pid, cc, nbad, nnonfinite):
    """Per-program counts into the int64 [2, B*P*NUM_CC] buffer: out-of-range labels (class chunk 0 only, every
    chunk sees the same voxels) and non-finite entries (each chunk its own classes)."""
    n_cc = tl.num_programs(1)
    slot = pid.to(tl.int64) * n_cc + cc
    total = tl.num_programs(0).to(tl.int64) * n_cc
    tl.store(cnt_ptr + slot, tl.sum(nbad.to(tl.int64), axis=0) * (cc == 0).to(tl.int64))
    tl.store(cnt_ptr + total + slot, tl.sum(nnonfinite.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["C", "P", "tiles_per_prog", "ignore_index", "has_ignore", "right"])
def _stats_fwd_kernel(
    x_ptr,  # [B, C, N] input (float32/float16/bfloat16)
    t_ptr,  # [B, N] integer labels or [B, C, N] dense target
    e_ptr,  # [M + 1] edges (hard) or [M] centres (soft), float32
    part_ptr,  # [3, B * P, C, M] float32 per-program partial count / sum_p / sum_y
    cnt_ptr,  # [2, B * P * NUM_CC] int64 per-program out-of-range label / non-finite entry counts
    C,
    N,
    P,
    tiles_per_prog,
    ignore_index,
    has_ignore,
    right,
    NUM_BINS: tl.constexpr,
    M_PAD: tl.constexpr,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """Register-histogram forward (num_bins <= MAX_REGISTER_BINS): one masked pass over the tile per bin."""
    pid = tl.program_id(0)
    cc = tl.program_id(1)
    b = pid // P
    pn = pid % P
    b64 = b.to(tl.int64)
    x_img = x_ptr + b64 * C * N
    c = cc * C_BLOCK + tl.arange(0, C_BLOCK)
    cmask = c < C
    mcol = tl.arange(0, M_PAD)
    acc_n = tl.zeros([C_BLOCK, M_PAD], tl.float32)
    acc_p = tl.zeros([C_BLOCK, M_PAD], tl.float32)
    acc_y = tl.zeros([C_BLOCK, M_PAD], tl.float32)
    nbad = tl.zeros([BLOCK_N], tl.int32)
    nnf = tl.zeros([BLOCK_N], tl.int32)
    tile0 = pn.to(tl.int64) * tiles_per_prog
    for it in range(0, tiles_per_prog):
        n = (tile0 + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        p, y, valid, bad, nonfinite = _tile_probs(
            x_img,
            t_ptr,
            b64,
            c,
            cmask,
            n,
            nmask,
            C,
            N,
            ignore_index,
            has_ignore,
            C_BLOCK,
            BLOCK_N,
            ACTIVATION,
            LABELS,
            SINGLE_CHUNK,
        )
        nbad += bad.to(tl.int32)
        nnf += nonfinite
        if SOFT:
            lo, w_lo, w_hi, slope = _soft_bins(p, e_ptr, NUM_BINS)
            lo = tl.where(valid, lo, -2)  # -2: neither lo nor lo+1 can match a bin
            for m in range(NUM_BINS):
                w = tl.where(lo == m, w_lo, 0.0) + tl.where(lo == m - 1, w_hi, 0.0)
                cm = tl.sum(w, axis=1)
                pm = tl.sum(w * p, axis=1)
                ym = tl.sum(w * y, axis=1)
                sel = (mcol == m)[None, :]
                acc_n += tl.where(sel, cm[:, None], 0.0)
                acc_p += tl.where(sel, pm[:, None], 0.0)
                acc_y += tl.where(sel, ym[:, None], 0.0)
        else:
            j = _hard_bin(p, e_ptr, right, NUM_BINS)
            j = tl.where(valid, j, -1)
            if LABELS:
                # y is 0/1: count and sum_y travel as one exact float, 1 + _PACK*y per voxel (a tile sums to at
                # most BLOCK_N * (1 + _PACK) <= 2^21 + 2^10 < 2^24), split per tile: one masked sum fewer per bin.
                packed = 1.0 + _PACK * y
            for m in range(NUM_BINS):
                hit = j == m
                if LABELS:
                    both = tl.sum(tl.where(hit, packed, 0.0), axis=1)
                    ym = tl.floor(both * (1.0 / _PACK))
                    cm = both - ym * _PACK
                else:
                    cm = tl.sum(hit.to(tl.float32), axis=1)
                    ym = tl.sum(tl.where(hit, y, 0.0), axis=1)
                pm = tl.sum(tl.where(hit, p, 0.0), axis=1)
                sel = (mcol == m)[None, :]
                acc_n += tl.where(sel, cm[:, None], 0.0)
                acc_p += tl.where(sel, pm[:, None], 0.0)
                acc_y += tl.where(sel, ym[:, None], 0.0)
    BP = tl.num_programs(0).to(tl.int64)  # = B * P
    offs = (pid.to(tl.int64) * C + c[:, None].to(tl.int64)) * NUM_BINS + mcol[None, :]
    omask = cmask[:, None] & (mcol < NUM_BINS)[None, :]
    stat_stride = BP * C * NUM_BINS
    tl.store(part_ptr + offs, acc_n, mask=omask)
    tl.store(part_ptr + stat_stride + offs, acc_p, mask=omask)
    tl.store(part_ptr + 2 * stat_stride + offs, acc_y, mask=omask)
    _store_counts(cnt_ptr, pid, cc, nbad, nnf)


@triton.jit
def _add_to_partials(ptr, stat_stride, mask, s_n, s_p, s_y):
    """partial[stat] += s (float64) at ``ptr`` (+ stat * stat_stride) where ``mask``: plain load/add/store, the
    caller guarantees that no two masked lanes share an address."""
    old = tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(ptr, old + s_n.to(tl.float64), mask=mask)
    old = tl.load(ptr + stat_stride, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(ptr + stat_stride, old + s_p.to(tl.float64), mask=mask)
    old = tl.load(ptr + 2 * stat_stride, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(ptr + 2 * stat_stride, old + s_y.to(tl.float64), mask=mask)


@triton.jit
def _group_sum(same, v):
    """For each lane i of each row: sum of v over the lanes j of that row with same[:, i, j]."""
    return tl.sum(tl.where(same, tl.expand_dims(v, 1), 0.0), axis=2)


@triton.jit(do_not_specialize=["C", "P", "tiles_per_prog", "ignore_index", "has_ignore", "right"])
def _stats_fwd_scatter_kernel(
    x_ptr,  # [B, C, N] input (float32/float16/bfloat16)
    t_ptr,  # [B, N] integer labels or [B, C, N] dense target
    e_ptr,  # [M + 1] edges (hard) or [M] centres (soft), float32
    part_ptr,  # [3, B * P, C, M] float64 per-program partial count / sum_p / sum_y, zero-initialised
    cnt_ptr,  # [2, B * P * NUM_CC] int64 per-program out-of-range label / non-finite entry counts
    C,
    N,
    P,
    tiles_per_prog,
    ignore_index,
    has_ignore,
    right,
    NUM_BINS: tl.constexpr,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """Scatter forward (num_bins > MAX_REGISTER_BINS): per tile, group equal bins of a class row by all-pairs
    comparison; each group's leader adds the group sums into this program's partial row (see module doc)."""
    pid = tl.program_id(0)
    cc = tl.program_id(1)
    b = pid // P
    pn = pid % P
    b64 = b.to(tl.int64)
    x_img = x_ptr + b64 * C * N
    c = cc * C_BLOCK + tl.arange(0, C_BLOCK)
    cmask = c < C
    lane = tl.arange(0, BLOCK_N)
    stat_stride = tl.num_programs(0).to(tl.int64) * C * NUM_BINS
    row = part_ptr + (pid.to(tl.int64) * C + c.to(tl.int64)) * NUM_BINS  # [C_BLOCK] this program's rows
    nbad = tl.zeros([BLOCK_N], tl.int32)
    nnf = tl.zeros([BLOCK_N], tl.int32)
    tile0 = pn.to(tl.int64) * tiles_per_prog
    for it in range(0, tiles_per_prog):
        n = (tile0 + it) * BLOCK_N + lane
        nmask = n < N
        p, y, valid, bad, nonfinite = _tile_probs(
            x_img,
            t_ptr,
            b64,
            c,
            cmask,
            n,
            nmask,
            C,
            N,
            ignore_index,
            has_ignore,
            C_BLOCK,
            BLOCK_N,
            ACTIVATION,
            LABELS,
            SINGLE_CHUNK,
        )
        nbad += bad.to(tl.int32)
        nnf += nonfinite
        if SOFT:
            lo, w_lo, w_hi, slope = _soft_bins(p, e_ptr, NUM_BINS)
            key = tl.where(valid, lo, -1)
            w_lo = tl.where(valid, w_lo, 0.0)
            w_hi = tl.where(valid, w_hi, 0.0)
        else:
            key = tl.where(valid, _hard_bin(p, e_ptr, right, NUM_BINS), -1)
        # same[c, i, j]: lanes i and j of row c fall in the same bin; the group's leader is its first lane
        same = key[:, :, None] == key[:, None, :]
        first = tl.min(tl.where(same, lane[None, None, :], BLOCK_N), axis=2)
        lead = (first == lane[None, :]) & (key >= 0)
        at = row[:, None] + key  # [C_BLOCK, BLOCK_N] partial address of each lane's bin (used at leaders only)
        if SOFT:
            _add_to_partials(
                at,
                stat_stride,
                lead,
                _group_sum(same, w_lo),
                _group_sum(same, w_lo * p),
                _group_sum(same, w_lo * y),
            )
            tl.debug_barrier()  # group k's upper bin k+1 is group k+1's lower bin: a second round
            _add_to_partials(
                at + 1,
                stat_stride,
                lead & (key + 1 < NUM_BINS),
                _group_sum(same, w_hi),
                _group_sum(same, w_hi * p),
                _group_sum(same, w_hi * y),
            )
        else:
            if LABELS:
                # y is 0/1: count and sum_y as one exact float (a group sums to <= 64 * (1 + _PACK) < 2^24)
                both = _group_sum(same, y * _PACK + 1.0)
                s_y = tl.floor(both * (1.0 / _PACK))
                s_n = both - s_y * _PACK
            else:
                s_n = _group_sum(same, tl.full(p.shape, 1.0, tl.float32))
                s_y = _group_sum(same, y)
            _add_to_partials(at, stat_stride, lead, s_n, _group_sum(same, p), s_y)
        tl.debug_barrier()  # this tile's updates land before the next tile's loads (other lanes may read them)
    _store_counts(cnt_ptr, pid, cc, nbad, nnf)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_p(
    x,
    c,
    cmask,
    n,
    nmask,
    mx,
    den,
    t_ptr,
    e_ptr,
    gc_ptr,
    gp_ptr,
    gy_ptr,
    b64,
    C,
    N,
    ignore_index,
    has_ignore,
    right,
    NUM_BINS: tl.constexpr,
    SOFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    """(p, dL/dp) for one [C_BLOCK, BLOCK_N] tile; dL/dp = 0 on ignored voxels, padding and non-finite p (whose
    p is returned as 0)."""
    p = _probs(x, cmask, mx, den, ACTIVATION, SINGLE_CHUNK)
    y, keep, bad = _target(t_ptr, b64, c, n, cmask, nmask, C, N, ignore_index, has_ignore, LABELS)
    finite = _is_finite(p)
    valid = cmask[:, None] & keep[None, :] & finite
    p = tl.where(finite, p, 0.0)  # non-finite entries: gradient 0, and no NaN in the activation's chain rule
    g_row = (b64 * C + c[:, None].to(tl.int64)) * NUM_BINS  # [C_BLOCK, 1] row of the (B, C, M) grads
    if SOFT:
        lo, w_lo, w_hi, slope = _soft_bins(p, e_ptr, NUM_BINS)
        hi = tl.minimum(lo + 1, NUM_BINS - 1)
        gc_lo = tl.load(gc_ptr + g_row + lo, mask=valid, other=0.0)
        gp_lo = tl.load(gp_ptr + g_row + lo, mask=valid, other=0.0)
        gy_lo = tl.load(gy_ptr + g_row + lo, mask=valid, other=0.0)
        gc_hi = tl.load(gc_ptr + g_row + hi, mask=valid, other=0.0)
        gp_hi = tl.load(gp_ptr + g_row + hi, mask=valid, other=0.0)
        gy_hi = tl.load(gy_ptr + g_row + hi, mask=valid, other=0.0)
        # membership derivatives: dw_lo/dp = -slope, dw_hi/dp = +slope (0 outside the interior)
        g = (gc_hi - gc_lo) * slope + (gy_hi - gy_lo) * (y * slope)
        g += gp_lo * (w_lo - p * slope) + gp_hi * (w_hi + p * slope)
    else:
        j = _hard_bin(p, e_ptr, right, NUM_BINS)
        g = tl.load(gp_ptr + g_row + j, mask=valid, other=0.0)
    g = tl.where(valid, g, 0.0)
    return p, g


@triton.jit(do_not_specialize=["C", "P", "tiles_per_prog", "ignore_index", "has_ignore", "right"])
def _stats_bwd_kernel(
    gc_ptr,  # [B, C, M] float32 grad of count
    gp_ptr,  # [B, C, M] float32 grad of sum_p
    gy_ptr,  # [B, C, M] float32 grad of sum_y
    x_ptr,  # [B, C, N] input
    t_ptr,  # [B, N] labels or [B, C, N] dense target
    e_ptr,  # [M + 1] edges / [M] centres
    gx_ptr,  # [B, C, N] output grad, input's dtype
    C,
    N,
    P,
    tiles_per_prog,
    ignore_index,
    has_ignore,
    right,
    NUM_BINS: tl.constexpr,
    C_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFT: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // P
    pn = pid % P
    b64 = b.to(tl.int64)
    img = b64 * C * N
    x_img = x_ptr + img
    gx_img = gx_ptr + img
    tile0 = pn.to(tl.int64) * tiles_per_prog
    for it in range(0, tiles_per_prog):
        n = (tile0 + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        if SINGLE_CHUNK:
            c = tl.arange(0, C_BLOCK)
            cmask = c < C
            x = _load_x(x_img, c, n, cmask, nmask, N)
            zero = tl.zeros([BLOCK_N], tl.float32)
            p, g = _grad_p(
                x,
                c,
                cmask,
                n,
                nmask,
                zero,
                zero,
                t_ptr,
                e_ptr,
                gc_ptr,
                gp_ptr,
                gy_ptr,
                b64,
                C,
                N,
                ignore_index,
                has_ignore,
                right,
                NUM_BINS,
                SOFT,
                ACTIVATION,
                LABELS,
                True,
            )
            if ACTIVATION == 1:
                dot = tl.sum(p * g, axis=0)
                gx = p * (g - dot[None, :])
            elif ACTIVATION == 2:
                gx = g * p * (1.0 - p)
            else:
                gx = g
            offs = c[:, None].to(tl.int64) * N + n[None, :]
            tl.store(gx_img + offs, gx.to(gx_ptr.dtype.element_ty), mask=cmask[:, None] & nmask[None, :])
        else:
            if ACTIVATION == 1:
                mx, den = _softmax_norm(x_img, n, nmask, C, N, C_BLOCK, BLOCK_N)
                dot = tl.zeros([BLOCK_N], tl.float32)
                for c0 in range(0, C, C_BLOCK):
                    c = c0 + tl.arange(0, C_BLOCK)
                    cmask = c < C
                    x = _load_x(x_img, c, n, cmask, nmask, N)
                    p, g = _grad_p(
                        x,
                        c,
                        cmask,
                        n,
                        nmask,
                        mx,
                        den,
                        t_ptr,
                        e_ptr,
                        gc_ptr,
                        gp_ptr,
                        gy_ptr,
                        b64,
                        C,
                        N,
                        ignore_index,
                        has_ignore,
                        right,
                        NUM_BINS,
                        SOFT,
                        ACTIVATION,
                        LABELS,
                        False,
                    )
                    dot += tl.sum(p * g, axis=0)
            else:
                mx = tl.zeros([BLOCK_N], tl.float32)
                den = mx
                dot = mx
            for c0 in range(0, C, C_BLOCK):
                c = c0 + tl.arange(0, C_BLOCK)
                cmask = c < C
                x = _load_x(x_img, c, n, cmask, nmask, N)
                p, g = _grad_p(
                    x,
                    c,
                    cmask,
                    n,
                    nmask,
                    mx,
                    den,
                    t_ptr,
                    e_ptr,
                    gc_ptr,
                    gp_ptr,
                    gy_ptr,
                    b64,
                    C,
                    N,
                    ignore_index,
                    has_ignore,
                    right,
                    NUM_BINS,
                    SOFT,
                    ACTIVATION,
                    LABELS,
                    False,
                )
                if ACTIVATION == 1:
                    gx = p * (g - dot[None, :])
                elif ACTIVATION == 2:
                    gx = g * p * (1.0 - p)
                else:
                    gx = g
                offs = c[:, None].to(tl.int64) * N + n[None, :]
                tl.store(gx_img + offs, gx.to(gx_ptr.dtype.element_ty), mask=cmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launch heuristics
# ----------------------------------------------------------------------------------------------------------


def _env_pow2(name: str, default: int, minimum: int = 16) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {raw!r}")
    return value


def _max_register_bins() -> int:
    raw = os.environ.get("CALIBOPS_TRITON_MAX_REGISTER_BINS", "").strip()
    if not raw:
        return MAX_REGISTER_BINS
    value = int(raw)
    if not 0 <= value <= 1024:
        raise ValueError(f"CALIBOPS_TRITON_MAX_REGISTER_BINS must be an integer in [0, 1024], got {raw!r}")
    return value


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: few programs keep the Python-level overhead low


def _scatter_block_n(c_block: int) -> int:
    """Scatter kernel tile width: the largest power of two with c_block * width**2 <= SCATTER_PAIRS, clamped to
    [8, SCATTER_MAX_N]."""
    width = 1 << (math.isqrt(max(SCATTER_PAIRS // c_block, 1)).bit_length() - 1)
    return max(8, min(width, SCATTER_MAX_N))


def launch_config(B: int, C: int, N: int, num_bins: int, device: torch.device, backward: bool = False) -> dict:
    """Block sizes and grid for a ``[B, C, N]`` problem (see the module docstring for the heuristic).

    ``SCATTER`` (forward only) selects the scatter kernel (``num_bins > MAX_REGISTER_BINS``); ``M_PAD`` is the
    register histogram width of the other forward kernel."""
    c_block = min(triton.next_power_of_2(max(C, 1)), MAX_C_BLOCK)
    scatter = not backward and num_bins > _max_register_bins()
    if backward:
        tile, num_warps = 1024, 8  # 4 elements per thread: 45-80 registers (sm_90, C <= 32, hard/soft)
    elif c_block <= 8:
        tile, num_warps = 1024, 4  # 8 elements per thread: ~80-95 registers
    else:
        tile, num_warps = 512, 4  # 4 elements per thread: ~70-110 registers for 16-32 classes
    if scatter:
        block_n = _scatter_block_n(c_block)
        num_warps = _env_pow2("CALIBOPS_TRITON_WARPS_FWD", 4, 1)
    else:
        tile = _env_pow2("CALIBOPS_TRITON_TILE_BWD" if backward else "CALIBOPS_TRITON_TILE_FWD", tile)
        num_warps = _env_pow2("CALIBOPS_TRITON_WARPS_BWD" if backward else "CALIBOPS_TRITON_WARPS_FWD", num_warps, 1)
        block_n = max(16, min(tile // c_block, MAX_BLOCK_N))
    if device.type != "cuda":  # interpreter: no point in simulating lanes past the end of a tiny volume
        block_n = max(8 if scatter else 16, min(block_n, triton.next_power_of_2(max(N, 1))))
    num_cc = triton.cdiv(C, c_block)
    tiles = triton.cdiv(N, block_n)
    if backward:
        # one tile per program unless the grid would get huge (then a few consecutive tiles each)
        progs = max(1, min(tiles, (1 << 24) // max(B, 1)))
    else:
        # many programs (several waves at 4-6 resident per SM keep the tail short), each >= MIN_TILES_PER_PROG
        # tiles so the [B*P, C, M] partials stay small next to the input, and (register kernel) <=
        # MAX_TILES_PER_PROG tiles; the scatter kernel accumulates in float64 and needs no such bound, but keeps
        # P * M <= N so its partial rows stay within about the input's size
        target = PROGRAMS_PER_SM * _num_sms(device)
        progs = max(1, min(triton.cdiv(tiles, MIN_TILES_PER_PROG), triton.cdiv(target, max(B * num_cc, 1))))
        if scatter:
            progs = max(1, min(progs, N // num_bins))
        else:
            progs = max(progs, triton.cdiv(tiles, MAX_TILES_PER_PROG))
    tiles_per_prog = triton.cdiv(tiles, progs)
    progs = triton.cdiv(tiles, tiles_per_prog)
    return {
        "C_BLOCK": c_block,
        "BLOCK_N": block_n,
        "num_warps": num_warps,
        "P": progs,
        "tiles_per_prog": tiles_per_prog,
        "num_cc": num_cc,
        "M_PAD": triton.next_power_of_2(num_bins),
        "SCATTER": scatter,
    }


def _check_args(input, target, edges, num_bins, soft, activation, labels, ignore_index):
    if not isinstance(input, torch.Tensor) or input.dim() != 3:
        raise ValueError(f"input must be a [B, C, N] tensor, got {getattr(input, 'shape', type(input))}")
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"input must be float32, float16 or bfloat16, got {input.dtype}")
    B, C, N = input.shape
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    if num_bins > MAX_NUM_BINS:  # internal guard; the Python API checks the same cap first
        # bins are located from p * num_bins in float32 plus a one-step correction, exact up to 2**24 bins
        raise ValueError(f"num_bins must be <= 2**24 (the documented cap), got {num_bins}")
    if activation not in (0, 1, 2):
        raise ValueError(f"activation must be 0 (none), 1 (softmax) or 2 (sigmoid), got {activation!r}")
    if labels:
        if target.dtype not in _LABEL_DTYPES:
            raise TypeError(f"target labels must be uint8/int8/int16/int32/int64, got {target.dtype}")
        if tuple(target.shape) != (B, N):
            raise ValueError(f"target labels must have shape [B, N] = {(B, N)}, got {tuple(target.shape)}")
    else:
        if target.dtype not in _DENSE_DTYPES:
            raise TypeError(f"dense target must be float32/float16/bfloat16/bool/uint8, got {target.dtype}")
        if tuple(target.shape) != (B, C, N):
            raise ValueError(f"dense target must have the shape of input {(B, C, N)}, got {tuple(target.shape)}")
        if ignore_index is not None:
            raise ValueError("ignore_index is only supported with integer labels (labels=True)")
    want = num_bins if soft else num_bins + 1
    if edges.dtype != torch.float32 or edges.dim() != 1 or edges.numel() != want:
        raise ValueError(
            f"edges must be float32 of shape ({want},) for num_bins={num_bins}, soft={soft}; "
            f"got {edges.dtype} {tuple(edges.shape)}"
        )
    for name, t in (("target", target), ("edges", edges)):
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def _flags(soft, activation, labels, cfg):
    return {
        "NUM_BINS": cfg["M"],
        "C_BLOCK": cfg["C_BLOCK"],
        "BLOCK_N": cfg["BLOCK_N"],
        "SOFT": bool(soft),
        "ACTIVATION": int(activation),
        "LABELS": bool(labels),
        "SINGLE_CHUNK": cfg["num_cc"] == 1,
        "num_warps": cfg["num_warps"],
    }


def _target_arg(target: torch.Tensor) -> torch.Tensor:
    target = target.contiguous()
    return target.view(torch.uint8) if target.dtype == torch.bool else target


def _launch(kernel):
    """``kernel[grid](...)`` launcher: through ``wrap_triton`` when compiled (torch.compile traces into the
    ``triton_op``); directly under the interpreter, where ``wrap_triton`` rejects the kernel on torch <= 2.12
    and there is nothing for torch.compile to see through (the op is an opaque custom op there)."""
    return kernel if INTERPRETED else wrap_triton(kernel)


def _interpreter_scalars(*values: int) -> tuple:
    """The kernels' integer arguments: unchanged when compiled; under the interpreter, 0-d scalar tensors.

    Triton <= 3.6's interpreter wraps an int argument in a one-element array and ``range(C)`` calls ``int()``
    on it, which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); a 0-d
    value works with every numpy. Same dtype rule as the interpreter's own conversion (int32 when it fits)."""
    if not INTERPRETED:
        return values
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    out = []
    for v in values:
        v = int(v)
        dt, np_dt = (tl.int32, np.int32) if -(2**31) <= v < 2**31 else (tl.int64, np.int64)
        out.append(tl.core.tensor(TensorHandle(np.array(v, dtype=np_dt), dt), dt))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------------


def _triton_binned_stats(
    input: torch.Tensor,
    target: torch.Tensor,
    edges: torch.Tensor,
    num_bins: int,
    soft: bool,
    activation: int,
    labels: bool,
    ignore_index: Optional[int],  # noqa: UP045 - schema inference needs a real annotation
    right: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward statistics ``(count, sum_p, sum_y, bad)``, see docs/kernel_contract.md.

    ``bad`` is int64 of shape (2,): out-of-range labels, non-finite probability entries."""
    _check_args(input, target, edges, num_bins, soft, activation, labels, ignore_index)
    B, C, N = input.shape
    M = num_bins
    if B * C * N == 0:  # includes C = 0: empty statistics, nothing counted
        z = input.new_zeros((B, C, M), dtype=torch.float32)
        return z, z.clone(), z.clone(), input.new_zeros((2,), dtype=torch.int64)
    x = input.contiguous()
    t = _target_arg(target)
    e = edges.contiguous()
    cfg = launch_config(B, C, N, M, x.device)
    cfg["M"] = M
    P = cfg["P"]
    grid = (B * P, cfg["num_cc"])
    counts = torch.empty((2, B * P * cfg["num_cc"]), dtype=torch.int64, device=x.device)
    args = _interpreter_scalars(
        C,
        N,
        P,
        cfg["tiles_per_prog"],
        0 if ignore_index is None else int(ignore_index),
        int(labels and ignore_index is not None),
        int(right),
    )
    if cfg["SCATTER"]:
        part = torch.zeros((3, B * P, C, M), dtype=torch.float64, device=x.device)
        _launch(_stats_fwd_scatter_kernel)[grid](x, t, e, part, counts, *args, **_flags(soft, activation, labels, cfg))
    else:
        part = torch.empty((3, B * P, C, M), dtype=torch.float32, device=x.device)
        _launch(_stats_fwd_kernel)[grid](
            x, t, e, part, counts, *args, M_PAD=cfg["M_PAD"], **_flags(soft, activation, labels, cfg)
        )
    part = part.view(3, B, P, C, M)
    # fixed-order merge over P (float64 partials of the scatter kernel are rounded once, here)
    count, sum_p, sum_y = (part[s].sum(dim=1).to(torch.float32) for s in range(3))
    return count, sum_p, sum_y, counts.sum(dim=1)


def _triton_binned_stats_backward(
    grad_count: torch.Tensor,
    grad_sum_p: torch.Tensor,
    grad_sum_y: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    edges: torch.Tensor,
    num_bins: int,
    soft: bool,
    activation: int,
    labels: bool,
    ignore_index: Optional[int],  # noqa: UP045 - schema inference needs a real annotation
    right: bool,
) -> torch.Tensor:
    """Gradient w.r.t. ``input`` from the gradients of the (B, C, M) statistics (one pass)."""
    _check_args(input, target, edges, num_bins, soft, activation, labels, ignore_index)
    B, C, N = input.shape
    M = num_bins
    for name, g in (("grad_count", grad_count), ("grad_sum_p", grad_sum_p), ("grad_sum_y", grad_sum_y)):
        if tuple(g.shape) != (B, C, M):
            raise ValueError(f"{name} must have shape {(B, C, M)}, got {tuple(g.shape)}")
    grad = torch.empty((B, C, N), dtype=input.dtype, device=input.device)
    if B * C * N == 0:
        return grad
    x = input.contiguous()
    t = _target_arg(target)
    gc, gp, gy = (g.contiguous().float() for g in (grad_count, grad_sum_p, grad_sum_y))
    cfg = launch_config(B, C, N, M, x.device, backward=True)
    cfg["M"] = M
    P = cfg["P"]
    _launch(_stats_bwd_kernel)[(B * P,)](
        gc,
        gp,
        gy,
        x,
        t,
        edges.contiguous(),
        grad,
        *_interpreter_scalars(
            C,
            N,
            P,
            cfg["tiles_per_prog"],
            0 if ignore_index is None else int(ignore_index),
            int(labels and ignore_index is not None),
            int(right),
        ),
        **_flags(soft, activation, labels, cfg),
    )
    return grad


def _register(name: str, impl, fake) -> None:
    """Register ``impl`` as ``calibops::<name>``.

    Compiled Triton (GPU): :func:`torch.library.triton_op`, so torch.compile traces into the kernels.
    Under ``TRITON_INTERPRET=1`` the kernels are plain Python functions that ``wrap_triton`` cannot trace
    (it would run them on fake tensors), so the same implementation is registered as an opaque
    :func:`torch.library.custom_op` with a shape-only fake kernel instead: identical schema and results,
    and torch.compile / opcheck still work on CPU tensors in tests."""
    if INTERPRETED:
        op = torch.library.custom_op(f"calibops::{name}", impl, mutates_args=())
        op.register_fake(fake)
    else:
        triton_op(f"calibops::{name}", impl, mutates_args=())


INTERPRETED = not isinstance(_stats_fwd_kernel, triton.runtime.JITFunction)
_register("triton_binned_stats", _triton_binned_stats, _ops._stats_fake)
_register("triton_binned_stats_backward", _triton_binned_stats_backward, _ops._stats_backward_fake)
binned_stats = torch.ops.calibops.triton_binned_stats
binned_stats_backward = torch.ops.calibops.triton_binned_stats_backward
_ops.register_stats_autograd("calibops::triton_binned_stats", binned_stats_backward)
