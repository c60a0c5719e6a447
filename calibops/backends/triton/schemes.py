"""Binning schemes of the Triton backend: one membership function per scheme (docs/kernel_contract.md).

A scheme maps a finite confidence ``q`` (a float32 tile) to ``(j, w, dw)``: weight ``w`` in bin ``j`` and
``1 - w`` in bin ``j + 1`` (when ``j + 1 < M``; ``j`` is always in ``[0, M - 1]``), with ``dw = dw/dq`` (bin
``j + 1`` has slope ``-dw``). The kernels (calibops/backends/triton/kernels.py) call :func:`membership` and never look
at a scheme's internals, except for one compile-time property: a scheme listed in :data:`ONE_BIN` always puts
the whole entry in bin ``j`` (``w == 1``, ``dw == 0``), which lets the kernels skip the second bin and the
weights entirely (the hard scheme's fast path).

Adding a scheme here: write ``_<name>_membership`` with the signature below, add a branch to
:func:`membership`, and list its id in :data:`ONE_BIN` only if it never splits an entry. Its id lives in
``calibops/contract.py``; its edges in ``calibops/reference.py``.

Callers pass ``q`` already made finite (entries that are left out get ``q = 0`` and a mask), so no NaN reaches a
bin computation; every bin index is clamped into ``[0, M - 1]`` before any load from ``e_ptr``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...contract import SCHEME_HARD, SCHEME_SOFT

__all__ = ["ONE_BIN", "membership"]

#: Scheme ids whose memberships never split an entry (w == 1, dw == 0 everywhere).
ONE_BIN = frozenset({SCHEME_HARD})
_SOFT = tl.constexpr(SCHEME_SOFT)  # jit code reads globals only as constexprs


@triton.jit
def _hard_membership(q, e_ptr, right, NUM_BINS: tl.constexpr):
    """Hard bins, edges ``e[0..M]``: ``j = #{k in 1..M : e[k] < q}`` (``<=`` when ``right``), clamped to M - 1.

    Estimates ``j0 = clamp(q*M, 0, M-1)`` (the edges are uniform) and corrects it by one step against
    ``e[j0]`` and ``e[j0+1]``, so the result equals ``bucketize(q, e[1:], right).clamp(max=M-1)`` exactly."""
    s = q * NUM_BINS
    s = tl.where(s > 0.0, s, 0.0)  # NaN -> 0
    s = tl.where(s < NUM_BINS - 1, s, NUM_BINS - 1)
    j0 = s.to(tl.int32)
    e_lo = tl.load(e_ptr + j0)
    e_hi = tl.load(e_ptr + j0 + 1)
    # right=False: step down when q <= e[j0], up when q > e[j0+1]; right=True: when q < e[j0], q >= e[j0+1]
    is_right = (tl.zeros_like(j0) + right) != 0  # runtime flag as a tensor: scalar & tensor masks break the interpreter
    down = (q < e_lo) | ((~is_right) & (q == e_lo))
    up = (q > e_hi) | (is_right & (q == e_hi))
    j = j0 - (down & (j0 > 0)).to(tl.int32) + up.to(tl.int32)
    j = tl.minimum(tl.maximum(j, 0), NUM_BINS - 1)
    return j, tl.full(q.shape, 1.0, tl.float32), tl.zeros(q.shape, tl.float32)


@triton.jit
def _soft_membership(q, e_ptr, right, NUM_BINS: tl.constexpr):
    """Soft (triangular) bins, centres ``c[0..M-1]``: ``t = #{k : c[k] < q} - 1`` in -1..M-1 (``c[k] <= q`` when
    ``right``: q exactly on a centre takes the slope of the interval above it); ``t == -1``: ``(0, 1, 0)``;
    ``t == M-1``: ``(M-1, 1, 0)``; otherwise ``(t, (c[t+1] - q) / d, -1 / d)``, ``d = c[t+1] - c[t]``.

    ``u = t + 1`` is estimated as ``floor(q*M + 1/2)`` (centres ``~ (k + 1/2) / M``) and corrected by one step
    against the neighbouring centres."""
    if NUM_BINS == 1:
        j = tl.zeros(q.shape, tl.int32)
        w = tl.full(q.shape, 1.0, tl.float32)
        dw = tl.zeros(q.shape, tl.float32)
    else:
        s = q * NUM_BINS + 0.5
        s = tl.where(s > 0.0, s, 0.0)  # NaN -> 0
        s = tl.where(s < NUM_BINS, s, NUM_BINS)
        u0 = s.to(tl.int32)
        c_below = tl.load(e_ptr + tl.maximum(u0 - 1, 0))
        c_at = tl.load(e_ptr + tl.minimum(u0, NUM_BINS - 1))
        is_right = (tl.zeros_like(u0) + right) != 0  # runtime flag as a tensor (see _hard_membership)
        below = (c_below < q) | (is_right & (c_below == q))  # c[u0 - 1] counts
        at = (c_at < q) | (is_right & (c_at == q))  # c[u0] counts
        dec = (u0 > 0) & (~below)
        inc = (u0 < NUM_BINS) & at
        t = u0 - dec.to(tl.int32) + inc.to(tl.int32) - 1
        t = tl.minimum(tl.maximum(t, -1), NUM_BINS - 1)
        lo = tl.minimum(tl.maximum(t, 0), NUM_BINS - 2)
        c_lo = tl.load(e_ptr + lo)
        c_hi = tl.load(e_ptr + lo + 1)
        d = c_hi - c_lo
        interior = (t >= 0) & (t < NUM_BINS - 1)
        j = tl.maximum(t, 0)
        w = tl.where(interior, (c_hi - q) / d, 1.0)
        dw = tl.where(interior, -1.0 / d, 0.0)
    return j, w, dw


@triton.jit
def membership(q, e_ptr, right, NUM_BINS: tl.constexpr, SCHEME: tl.constexpr):
    """``(j, w, dw)`` of the scheme ``SCHEME`` for the float32 tile ``q`` (same shape each; ``j`` int32)."""
    if SCHEME == _SOFT:
        j, w, dw = _soft_membership(q, e_ptr, right, NUM_BINS)
    else:
        j, w, dw = _hard_membership(q, e_ptr, right, NUM_BINS)
    return j, w, dw
