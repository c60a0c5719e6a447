"""The Triton kernels of the statistics ops: one forward and one backward kernel (docs/kernel_contract.md).

Every kernel has one body for every option; the options are ``tl.constexpr`` so each configuration compiles
to its own specialised code (an option that is off costs nothing):

- ``SCHEME`` / ``ONE_BIN``: the binning scheme (calibops/backends/triton/schemes.py); ``ONE_BIN`` schemes (hard) never
  split an entry, so the second bin and the weights drop out at compile time.
- ``MODE``: 0 marginal (rows k = c, one program axis per class chunk), 1 top-label (one row per voxel).
- ``MOMENTS``: also accumulate ``sum_p2`` and ``sum_py``.
- ``NUM_RATERS`` / ``R_PAD``: label maps per image (1: the single-rater code; more: ``[K, R_PAD, ...]`` tiles).
- ``SCATTER`` (forward): the scatter binning (num_bins > MAX_REGISTER_BINS) instead of the register histogram.
- ``PACKED``: 0/1 targets of one rater under a one-bin scheme: count and sum_y travel as one exact float
  ``1 + _PACK*y`` (a tile sums to at most ``BLOCK_N * (1 + _PACK) <= 2^21 + 2^10 < 2^24``), one sum fewer per bin.

Partial statistics: ``part [S, B*P, K, M]`` with ``S = 2 + R + 2*MOMENTS`` planes in the order count, sum_p,
sum_y of rater 0..R-1, sum_p2, sum_py; program ``(b*P + pn, cc)`` owns rows ``[b*P + pn, k-chunk, :]`` of every
plane, and the launcher sums them over P in a fixed order (bitwise deterministic run to run).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .schemes import membership
from .tiles import (
    entries,
    is_finite,
    load_x,
    marginal_targets,
    normaliser,
    probs,
    rater,
    top_label,
    top_targets,
    voxels,
)

__all__ = ["_stats_bwd_kernel", "_stats_fwd_kernel"]

_PACK = tl.constexpr(2048.0)
_RUNTIME_INTS = ["C", "P", "tiles_per_prog", "ignore_index", "has_ignore", "right"]


@triton.jit
def _partial_rows(pid, cc, C, NUM_BINS: tl.constexpr, C_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, MODE: tl.constexpr):
    """(offset [K_BLOCK] of this program's rows in one plane of ``part``, row mask, plane stride)."""
    BP = tl.num_programs(0).to(tl.int64)  # = B * P
    if MODE == 0:
        k = cc * C_BLOCK + tl.arange(0, K_BLOCK)
        kmask = k < C
        row = pid.to(tl.int64) * C + k.to(tl.int64)
        stride = BP * C * NUM_BINS
    else:
        k = tl.arange(0, K_BLOCK)  # K_BLOCK == 1: the top-label row
        kmask = k < 1
        row = pid.to(tl.int64) + k.to(tl.int64)
        stride = BP * NUM_BINS
    return row * NUM_BINS, kmask, stride


@triton.jit
def _store_counts(cnt_ptr, pid, cc, nbad, nnonfinite):
    """Per-program counts into the int64 [2, B*P*GRID_CC] buffer: out-of-range labels (class chunk 0 only, every
    chunk sees the same voxels) and non-finite p (each chunk its own classes; top-label: one program, all)."""
    n_cc = tl.num_programs(1)
    slot = pid.to(tl.int64) * n_cc + cc
    total = tl.num_programs(0).to(tl.int64) * n_cc
    tl.store(cnt_ptr + slot, tl.sum(nbad.to(tl.int64), axis=0) * (cc == 0).to(tl.int64))
    tl.store(cnt_ptr + total + slot, tl.sum(nnonfinite.to(tl.int64), axis=0))


@triton.jit
def _put(acc, v, sel):
    """acc[:, m] += v where sel = (mcol == m) (register histogram column update)."""
    return acc + tl.where(sel, v[:, None], 0.0)


@triton.jit
def _add(ptr, mask, s):
    """partial += s (float64) at ``ptr`` where ``mask``: plain load/add/store, the caller guarantees that no two
    masked lanes share an address."""
    old = tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(ptr, old + s.to(tl.float64), mask=mask)


@triton.jit
def _group_sum(same, v):
    """For each lane i of each row: sum of v over the lanes j of that row with same[:, i, j]."""
    return tl.sum(tl.where(same, tl.expand_dims(v, 1), 0.0), axis=2)


@triton.jit
def _scatter_round(
    at,
    stride,
    mask,
    wt,
    q,
    y,
    qq,
    qy,
    same,
    MOMENTS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
    PACKED: tl.constexpr,
):
    """Add the group sums of the weights ``wt`` (count), ``wt*q``, ``wt*y_r`` and the moments at the leaders'
    addresses ``at`` of plane 0 (planes ``stride`` apart)."""
    if PACKED:  # one-bin scheme, 0/1 targets of one rater (wt == 1): count and sum_y in one exact float
        both = _group_sum(same, y * _PACK + 1.0)
        s_y = tl.floor(both * (1.0 / _PACK))
        _add(at, mask, both - s_y * _PACK)
        _add(at + stride, mask, _group_sum(same, q))
        _add(at + 2 * stride, mask, s_y)
    else:
        _add(at, mask, _group_sum(same, wt))
        _add(at + stride, mask, _group_sum(same, wt * q))
        if NUM_RATERS == 1:
            _add(at + 2 * stride, mask, _group_sum(same, wt * y))
        else:
            for r in tl.static_range(NUM_RATERS):
                _add(at + (2 + r) * stride, mask, _group_sum(same, wt * rater(y, r, R_PAD)))
    if MOMENTS:
        _add(at + (2 + NUM_RATERS) * stride, mask, _group_sum(same, wt * qq))
        _add(at + (3 + NUM_RATERS) * stride, mask, _group_sum(same, wt * qy))


@triton.jit
def _scatter_tile(
    rowp,
    stride,
    lane,
    j,
    w,
    q,
    y,
    ybar,
    valid,
    NUM_BINS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BIN: tl.constexpr,
    MOMENTS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
    PACKED: tl.constexpr,
):
    """One tile of the scatter forward (``lane = tl.arange(0, BLOCK_N)``): group equal bins of a row by all-pairs
    comparison; each group's leader adds the group sums into this program's partial rows ``rowp`` (binned_stats
    module doc). Two-bin schemes update in two rounds (bins j, then bins j + 1), each writing distinct addresses.
    Work per entry: O(BLOCK_N), whatever the number of bins."""
    key = tl.where(valid, j, -1)
    qq = q
    qy = q
    if MOMENTS:
        qq = q * q
        qy = q * ybar
    # same[k, i, j]: lanes i and j of row k fall in the same bin; the group's leader is its first lane
    same = key[:, :, None] == key[:, None, :]
    first = tl.min(tl.where(same, lane[None, None, :], BLOCK_N), axis=2)
    lead = (first == lane[None, :]) & (key >= 0)
    at = rowp[:, None] + key  # [K_BLOCK, BLOCK_N] partial address of each lane's bin (used at leaders only)
    if ONE_BIN:
        _scatter_round(at, stride, lead, w, q, y, qq, qy, same, MOMENTS, NUM_RATERS, R_PAD, PACKED)
    else:
        _scatter_round(at, stride, lead, w, q, y, qq, qy, same, MOMENTS, NUM_RATERS, R_PAD, False)
        tl.debug_barrier()  # group k's bin j + 1 may be group k'`s bin j: a second round
        upper = lead & (key + 1 < NUM_BINS)
        _scatter_round(at + 1, stride, upper, 1.0 - w, q, y, qq, qy, same, MOMENTS, NUM_RATERS, R_PAD, False)
    tl.debug_barrier()  # this tile's updates land before the next tile's loads (other lanes may read them)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _stats_fwd_kernel(
    x_ptr,  # [B, C, N] input (float32/float16/bfloat16)
    t_ptr,  # [B, R, N] integer labels or [B, C, N] dense target
    e_ptr,  # [M + 1] edges (hard) or [M] centres (soft), float32
    part_ptr,  # [S, B * P, K, M] per-program partial statistics: float32, or float64 zero-initialised (SCATTER)
    cnt_ptr,  # [2, B * P * GRID_CC] int64 per-program out-of-range label / non-finite p counts
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
    K_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCHEME: tl.constexpr,
    ONE_BIN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    MODE: tl.constexpr,
    MOMENTS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
    PACKED: tl.constexpr,
    SCATTER: tl.constexpr,
):
    """The forward: the entries of each tile and their memberships, binned by one of two strategies that
    ``SCATTER`` picks at compile time (binned_stats module doc):

    - register histogram (num_bins <= MAX_REGISTER_BINS): one masked pass over the tile per bin into
      ``[K_BLOCK, M_PAD]`` register accumulators, stored once at the end;
    - scatter (num_bins > MAX_REGISTER_BINS): :func:`_scatter_tile` adds each tile's group sums straight into
      this program's float64 partial rows (``M_PAD`` unused)."""
    pid = tl.program_id(0)
    cc = tl.program_id(1)
    b = pid // P
    pn = pid % P
    b64 = b.to(tl.int64)
    x_img = x_ptr + b64 * C * N
    if SCATTER:
        lane = tl.arange(0, BLOCK_N)
        row, kmask, stride = _partial_rows(pid, cc, C, NUM_BINS, C_BLOCK, K_BLOCK, MODE)
        rowp = part_ptr + row  # [K_BLOCK] this program's rows of plane 0
    else:
        mcol = tl.arange(0, M_PAD)
        acc_n = tl.zeros([K_BLOCK, M_PAD], tl.float32)
        acc_p = tl.zeros([K_BLOCK, M_PAD], tl.float32)
        if NUM_RATERS == 1:
            acc_y = tl.zeros([K_BLOCK, M_PAD], tl.float32)
        else:
            acc_y = tl.zeros([K_BLOCK, R_PAD, M_PAD], tl.float32)
        if MOMENTS:
            acc_p2 = tl.zeros([K_BLOCK, M_PAD], tl.float32)
            acc_py = tl.zeros([K_BLOCK, M_PAD], tl.float32)
    nbad = tl.zeros([BLOCK_N], tl.int32)
    nnf = tl.zeros([BLOCK_N], tl.int32)
    tile0 = pn.to(tl.int64) * tiles_per_prog
    for it in range(0, tiles_per_prog):
        n = (tile0 + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        q, y, ybar, valid, bad, nonfinite = entries(
            x_img,
            t_ptr,
            b64,
            cc,
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
            MODE,
            NUM_RATERS,
            R_PAD,
        )
        nbad += bad
        nnf += nonfinite
        j, w, dw = membership(q, e_ptr, right, NUM_BINS, SCHEME)
        if SCATTER:
            _scatter_tile(
                rowp,
                stride,
                lane,
                j,
                w,
                q,
                y,
                ybar,
                valid,
                NUM_BINS,
                BLOCK_N,
                ONE_BIN,
                MOMENTS,
                NUM_RATERS,
                R_PAD,
                PACKED,
            )
        else:
            j = tl.where(valid, j, -2)  # -2: neither j nor j + 1 matches a bin
            if MOMENTS:
                qq = q * q
                qy = q * ybar
            if ONE_BIN:
                if PACKED:
                    packed = 1.0 + _PACK * y
                for m in range(NUM_BINS):
                    hit = j == m
                    if PACKED:
                        both = tl.sum(tl.where(hit, packed, 0.0), axis=1)
                        ym = tl.floor(both * (1.0 / _PACK))
                        cm = both - ym * _PACK
                    else:
                        cm = tl.sum(hit.to(tl.float32), axis=1)
                        if NUM_RATERS == 1:
                            ym = tl.sum(tl.where(hit, y, 0.0), axis=1)
                        else:
                            ym = tl.sum(tl.where(hit[:, None, :], y, 0.0), axis=2)
                    pm = tl.sum(tl.where(hit, q, 0.0), axis=1)
                    sel = (mcol == m)[None, :]
                    acc_n = _put(acc_n, cm, sel)
                    acc_p = _put(acc_p, pm, sel)
                    if NUM_RATERS == 1:
                        acc_y = _put(acc_y, ym, sel)
                    else:
                        acc_y += tl.where((mcol == m)[None, None, :], ym[:, :, None], 0.0)
                    if MOMENTS:
                        acc_p2 = _put(acc_p2, tl.sum(tl.where(hit, qq, 0.0), axis=1), sel)
                        acc_py = _put(acc_py, tl.sum(tl.where(hit, qy, 0.0), axis=1), sel)
            else:
                w1 = 1.0 - w  # bin j + 1 gets the rest of the entry's unit weight
                for m in range(NUM_BINS):
                    wm = tl.where(j == m, w, 0.0) + tl.where(j == m - 1, w1, 0.0)
                    sel = (mcol == m)[None, :]
                    acc_n = _put(acc_n, tl.sum(wm, axis=1), sel)
                    acc_p = _put(acc_p, tl.sum(wm * q, axis=1), sel)
                    if NUM_RATERS == 1:
                        acc_y = _put(acc_y, tl.sum(wm * y, axis=1), sel)
                    else:
                        ym = tl.sum(wm[:, None, :] * y, axis=2)
                        acc_y += tl.where((mcol == m)[None, None, :], ym[:, :, None], 0.0)
                    if MOMENTS:
                        acc_p2 = _put(acc_p2, tl.sum(wm * qq, axis=1), sel)
                        acc_py = _put(acc_py, tl.sum(wm * qy, axis=1), sel)
    if not SCATTER:
        row, kmask, stride = _partial_rows(pid, cc, C, NUM_BINS, C_BLOCK, K_BLOCK, MODE)
        offs = row[:, None] + mcol[None, :]
        omask = kmask[:, None] & (mcol < NUM_BINS)[None, :]
        tl.store(part_ptr + offs, acc_n, mask=omask)
        tl.store(part_ptr + stride + offs, acc_p, mask=omask)
        if NUM_RATERS == 1:
            tl.store(part_ptr + 2 * stride + offs, acc_y, mask=omask)
        else:
            r = tl.arange(0, R_PAD)
            offs3 = (2 + r)[None, :, None].to(tl.int64) * stride + offs[:, None, :]
            tl.store(part_ptr + offs3, acc_y, mask=omask[:, None, :] & (r < NUM_RATERS)[None, :, None])
        if MOMENTS:
            tl.store(part_ptr + (2 + NUM_RATERS) * stride + offs, acc_p2, mask=omask)
            tl.store(part_ptr + (3 + NUM_RATERS) * stride + offs, acc_py, mask=omask)
    _store_counts(cnt_ptr, pid, cc, nbad, nnf)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_q(
    q,
    y,
    ybar,
    valid,
    grow,
    gc_ptr,
    gp_ptr,
    gy_ptr,
    gp2_ptr,
    gpy_ptr,
    e_ptr,
    right,
    NUM_BINS: tl.constexpr,
    SCHEME: tl.constexpr,
    ONE_BIN: tl.constexpr,
    MOMENTS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """dL/dq of the entries ``q`` (0 where not ``valid``) by the contract's formula; ``grow`` [K, 1]: offset of
    the entry's row (b, k) in the [B, K, M] gradients (``grow * R + r*M`` in the [B, K, R, M] grad of sum_y)."""
    j, w, dw = membership(q, e_ptr, right, NUM_BINS, SCHEME)
    if ONE_BIN:  # W = 1, D = 0: g = Gp[j] + 2q Gp2[j] + ybar Gpy[j]
        g = tl.load(gp_ptr + grow + j, mask=valid, other=0.0)
        if MOMENTS:
            g += 2.0 * q * tl.load(gp2_ptr + grow + j, mask=valid, other=0.0)
            g += ybar * tl.load(gpy_ptr + grow + j, mask=valid, other=0.0)
    else:
        # bin j + 1 (clamped): where j == M - 1 its weight 1 - w and slope -dw are 0, so the value loaded there
        # does not count (upstream gradients are finite)
        j1 = tl.minimum(j + 1, NUM_BINS - 1)
        if NUM_RATERS == 1:
            gyd = (
                tl.load(gy_ptr + grow + j, mask=valid, other=0.0) - tl.load(gy_ptr + grow + j1, mask=valid, other=0.0)
            ) * y
        else:
            gyd = tl.zeros(q.shape, tl.float32)
            for r in tl.static_range(NUM_RATERS):
                base = grow * NUM_RATERS + r * NUM_BINS
                gy0 = tl.load(gy_ptr + base + j, mask=valid, other=0.0)
                gyd += (gy0 - tl.load(gy_ptr + base + j1, mask=valid, other=0.0)) * rater(y, r, R_PAD)
        gc0 = tl.load(gc_ptr + grow + j, mask=valid, other=0.0)
        gc1 = tl.load(gc_ptr + grow + j1, mask=valid, other=0.0)
        gp0 = tl.load(gp_ptr + grow + j, mask=valid, other=0.0)
        gp1 = tl.load(gp_ptr + grow + j1, mask=valid, other=0.0)
        # sum over m in {j, j+1}: W = (w, 1 - w), D = (dw, -dw)
        g = (gc0 - gc1 + gyd) * dw + gp0 * (w + q * dw) + gp1 * (1.0 - w - q * dw)
        if MOMENTS:
            g += tl.load(gp2_ptr + grow + j, mask=valid, other=0.0) * (2.0 * q * w + q * q * dw)
            g += tl.load(gp2_ptr + grow + j1, mask=valid, other=0.0) * (2.0 * q * (1.0 - w) - q * q * dw)
            g += tl.load(gpy_ptr + grow + j, mask=valid, other=0.0) * ybar * (w + q * dw)
            g += tl.load(gpy_ptr + grow + j1, mask=valid, other=0.0) * ybar * (1.0 - w - q * dw)
    return tl.where(valid, g, 0.0)


@triton.jit
def _chain(p, g, dot, ACTIVATION: tl.constexpr):
    """dL/dx from p and g = dL/dp through the activation (softmax: ``dot`` = sum_k p[k] g[k] per voxel)."""
    if ACTIVATION == 1:
        gx = p * (g - dot[None, :])
    elif ACTIVATION == 2:
        gx = g * p * (1.0 - p)
    else:
        gx = g
    return gx


@triton.jit
def _store_grad(gx_img, c, n, nmask, C, N, gx):
    """Store the dL/dx tile ``gx`` of classes ``c`` in the input's dtype."""
    offs = c[:, None].to(tl.int64) * N + n[None, :]
    tl.store(gx_img + offs, gx.to(gx_img.dtype.element_ty), mask=(c < C)[:, None] & nmask[None, :])


@triton.jit
def _marginal_grad_p(
    x_img,
    t_ptr,
    lab,
    keep,
    b64,
    c,
    n,
    nmask,
    mx,
    den,
    C,
    N,
    e_ptr,
    right,
    gc_ptr,
    gp_ptr,
    gy_ptr,
    gp2_ptr,
    gpy_ptr,
    NUM_BINS: tl.constexpr,
    SCHEME: tl.constexpr,
    ONE_BIN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    MOMENTS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """(p, dL/dp) of the marginal entries of classes ``c`` [C_BLOCK, BLOCK_N]; non-finite p are returned as 0
    with dL/dp = 0 (no NaN reaches the activation's chain rule), unused entries get dL/dp = 0."""
    cmask = c < C
    p = probs(load_x(x_img, c, n, cmask, nmask, N), cmask, mx, den, ACTIVATION, SINGLE_CHUNK)
    finite = is_finite(p)
    valid = cmask[:, None] & keep[None, :] & finite
    p = tl.where(finite, p, 0.0)
    y, ybar = marginal_targets(t_ptr, lab, b64, c, cmask, n, nmask, C, N, LABELS, NUM_RATERS, R_PAD)
    grow = (b64 * C + c[:, None].to(tl.int64)) * NUM_BINS  # [C_BLOCK, 1] row of the (B, C, M) grads
    g = _grad_q(
        tl.where(valid, p, 0.0),
        y,
        ybar,
        valid,
        grow,
        gc_ptr,
        gp_ptr,
        gy_ptr,
        gp2_ptr,
        gpy_ptr,
        e_ptr,
        right,
        NUM_BINS,
        SCHEME,
        ONE_BIN,
        MOMENTS,
        NUM_RATERS,
        R_PAD,
    )
    return p, g


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _stats_bwd_kernel(
    gc_ptr,  # [B, K, M] float32 grad of count
    gp_ptr,  # [B, K, M] float32 grad of sum_p
    gy_ptr,  # [B, K, R, M] float32 grad of sum_y
    gp2_ptr,  # [B, K, M] float32 grad of sum_p2 (MOMENTS)
    gpy_ptr,  # [B, K, M] float32 grad of sum_py (MOMENTS)
    x_ptr,  # [B, C, N] input
    t_ptr,  # [B, R, N] labels or [B, C, N] dense target
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
    SCHEME: tl.constexpr,
    ONE_BIN: tl.constexpr,
    ACTIVATION: tl.constexpr,
    LABELS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    MODE: tl.constexpr,
    MOMENTS: tl.constexpr,
    NUM_RATERS: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """One read of input and target, one write of the gradient per tile (cost independent of M).

    Marginal: the tile's class chunks in one or two passes (``tl.static_range``: each pass its own loop). With
    softmax over several chunks, dL/dx needs ``dot = sum_k p[k] dL/dp[k]`` over all classes first: a first pass
    only sums it, the second writes. Otherwise one pass writes (one chunk and softmax: ``dot`` from the chunk
    itself). With one chunk the chunk loop has constant bounds and a single iteration, which the compiler
    replaces by its body: the same straight-line code as without a loop. Top-label: dL/dq once per voxel, then
    one write pass over the chunks, dL/dp = dL/dq at the predicted class only."""
    pid = tl.program_id(0)
    b = pid // P
    pn = pid % P
    b64 = b.to(tl.int64)
    img = b64 * C * N
    x_img = x_ptr + img
    gx_img = gx_ptr + img
    DOT_PASS: tl.constexpr = ACTIVATION == 1 and not SINGLE_CHUNK
    tile0 = pn.to(tl.int64) * tiles_per_prog
    for it in range(0, tiles_per_prog):
        n = (tile0 + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        lab, keep, nbad = voxels(t_ptr, b64, n, nmask, C, N, ignore_index, has_ignore, LABELS, NUM_RATERS, R_PAD)
        mx, den = normaliser(x_img, n, nmask, C, N, C_BLOCK, BLOCK_N, ACTIVATION, SINGLE_CHUNK)
        if MODE == 0:
            dot = tl.zeros([BLOCK_N], tl.float32)
            for phase in tl.static_range(1 + DOT_PASS):
                for c0 in range(0, C_BLOCK if SINGLE_CHUNK else C, C_BLOCK):
                    c = c0 + tl.arange(0, C_BLOCK)
                    p, g = _marginal_grad_p(
                        x_img,
                        t_ptr,
                        lab,
                        keep,
                        b64,
                        c,
                        n,
                        nmask,
                        mx,
                        den,
                        C,
                        N,
                        e_ptr,
                        right,
                        gc_ptr,
                        gp_ptr,
                        gy_ptr,
                        gp2_ptr,
                        gpy_ptr,
                        NUM_BINS,
                        SCHEME,
                        ONE_BIN,
                        ACTIVATION,
                        LABELS,
                        SINGLE_CHUNK,
                        MOMENTS,
                        NUM_RATERS,
                        R_PAD,
                    )
                    if phase < DOT_PASS:
                        dot += tl.sum(p * g, axis=0)
                    else:
                        if ACTIVATION == 1 and SINGLE_CHUNK:
                            dot = tl.sum(p * g, axis=0)
                        _store_grad(gx_img, c, n, nmask, C, N, _chain(p, g, dot, ACTIVATION))
        else:
            # top-label: dL/dq once per voxel, then dL/dp = dL/dq at the predicted class a only
            qv, a, nf = top_label(x_img, n, nmask, mx, den, C, N, C_BLOCK, BLOCK_N, ACTIVATION, SINGLE_CHUNK)
            ok = keep & (nf == 0)
            q = tl.where(ok, qv, 0.0)
            y, ybar = top_targets(t_ptr, lab, b64, a, n, nmask, C, N, LABELS, NUM_RATERS, R_PAD)
            grow = tl.zeros([1, 1], tl.int64) + b64 * NUM_BINS  # row (b, 0) of the (B, 1, M) grads
            gq = _grad_q(
                q[None, :],
                y,
                ybar,
                ok[None, :],
                grow,
                gc_ptr,
                gp_ptr,
                gy_ptr,
                gp2_ptr,
                gpy_ptr,
                e_ptr,
                right,
                NUM_BINS,
                SCHEME,
                ONE_BIN,
                MOMENTS,
                NUM_RATERS,
                R_PAD,
            )
            gq = tl.sum(gq, axis=0)  # [BLOCK_N]
            dot = q * gq  # softmax: sum_k p[k] dL/dp[k] = p[a] dL/dq (p[a] == q)
            for c0 in range(0, C, C_BLOCK):
                c = c0 + tl.arange(0, C_BLOCK)
                cmask = c < C
                p = probs(load_x(x_img, c, n, cmask, nmask, N), cmask, mx, den, ACTIVATION, SINGLE_CHUNK)
                p = tl.where(is_finite(p), p, 0.0)
                g = tl.where(c[:, None] == a[None, :], gq[None, :], 0.0)
                _store_grad(gx_img, c, n, nmask, C, N, _chain(p, g, dot, ACTIVATION))
