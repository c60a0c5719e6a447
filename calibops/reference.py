"""The pure-PyTorch specification of every calibops statistic, loss and metric (docs/usage.md "Semantics").

Everything here is vectorised (no Python loop over images, classes or bins), autograd-native and runs on any
device. Kernel backends must agree with these functions; tests compare them against each other.

Layers:
- :func:`bin_edges` / :func:`bin_centres`: the float32 edges and centres every backend bins with.
- :func:`binned_stats_prepared`: the (B, C, M) statistics from a prepared ``[B, C, N]`` input and target —
  the same signature and semantics as the kernel ops (docs/kernel_contract.md).

The formulas applied to the statistics afterwards (the loss epilogue, ECE / ACE / MCE) are shared by every
backend and live in :mod:`calibops.results`.
"""

from __future__ import annotations

import functools

import torch

from .contract import (
    ACT_NONE,
    ACT_SIGMOID,
    ACT_SOFTMAX,
    MODE_TOP_LABEL,
    SCHEME_HARD,
    SCHEME_SOFT,
    TARGET_LABELS,
    OpCall,
    check_args,
    implements_op,
)

__all__ = [
    "ACT_NONE",
    "ACT_SIGMOID",
    "ACT_SOFTMAX",
    "EPS32",
    "bin_centres",
    "bin_edges",
    "binned_stats_prepared",
    "scheme_edges",
]

EPS32 = float(torch.finfo(torch.float32).eps)


@functools.lru_cache(maxsize=64)
def _edges_cpu(num_bins: int, soft: bool) -> torch.Tensor:
    if soft:
        return torch.linspace(0.0, 1.0 + EPS32, 2 * num_bins + 1, dtype=torch.float32)[1::2].contiguous()
    return torch.linspace(0.0, 1.0 + EPS32, num_bins + 1, dtype=torch.float32)


_edges_device_cache: dict[tuple[int, bool, torch.device], torch.Tensor] = {}


def bin_edges(num_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Hard-binning edges ``e_k = linspace(0, 1 + eps32, M + 1)[k]`` in float32, shape (M + 1,).

    Computed once on the CPU (so every device bins with bit-identical edges) and cached per device.
    """
    return _edge_tensor(num_bins, False, torch.device(device))


def bin_centres(num_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Soft-binning centres ``c_j = linspace(0, 1 + eps32, 2M + 1)[2j + 1]`` in float32, shape (M,)."""
    return _edge_tensor(num_bins, True, torch.device(device))


def _edge_tensor(num_bins: int, soft: bool, device: torch.device) -> torch.Tensor:
    key = (num_bins, soft, device)
    t = _edges_device_cache.get(key)
    if t is None:
        t = _edges_cpu(num_bins, soft).to(device)
        if not torch.compiler.is_compiling():
            _edges_device_cache[key] = t
    return t


def _activate(x: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == ACT_SOFTMAX:
        return torch.softmax(x, dim=1)
    if activation == ACT_SIGMOID:
        return torch.sigmoid(x)
    return x


def scheme_edges(num_bins: int, scheme: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``edges`` argument of the kernel ops for ``scheme``: hard edges (M + 1) or soft centres (M), float32."""
    return _edge_tensor(num_bins, scheme == SCHEME_SOFT, torch.device(device))


def _membership(
    q: torch.Tensor, edges: torch.Tensor, num_bins: int, scheme: int, right: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The binning scheme as a membership function (docs/kernel_contract.md, "Binning schemes").

    ``q``: finite values (any shape). Returns ``(lo, w_lo, hi, w_hi)``: weight ``w_lo`` in bin ``lo`` and
    ``w_hi = 1 - w_lo`` in bin ``hi`` (``hi == lo`` with ``w_hi == 0`` where the scheme uses one bin), the weights
    differentiable w.r.t. ``q`` (their derivative is the scheme's ``dw``). A new scheme is one more branch here and
    one membership function per backend.
    """
    M = num_bins
    qd = q.detach().contiguous()
    if scheme == SCHEME_HARD:
        lo = torch.bucketize(qd, edges[1:].to(q.dtype), right=right).clamp_(max=M - 1)
        return lo, torch.ones_like(q), lo, torch.zeros_like(q)
    # soft: t = (number of centres below q) - 1, in -1 .. M-1; below means < (right=False) or <= (right=True), so
    # at an exact centre c[k] the slope is that of the interval below (t = k - 1) or above (t = k)
    t = torch.bucketize(qd, edges.to(q.dtype), right=right) - 1
    if M == 1:
        lo = torch.zeros_like(t)
        return lo, torch.ones_like(q), lo, torch.zeros_like(q)
    centres = edges.to(q.dtype)
    lo = t.clamp(0, M - 2)
    hi = lo + 1
    c_lo, c_hi = centres[lo], centres[hi]
    w_in = (c_hi - q) / (c_hi - c_lo)
    w_lo = torch.where(t < 0, torch.ones_like(q), torch.where(t >= M - 1, torch.zeros_like(q), w_in))
    return lo, w_lo, hi, 1.0 - w_lo  # w_hi: "the rest" of the entry's unit weight


@implements_op()
def binned_stats_prepared(call: OpCall) -> tuple[torch.Tensor, ...]:
    """Reference of the kernel op ``calibops::binned_stats`` (docs/kernel_contract.md, v2).

    Takes the op's arguments (:data:`calibops.contract.OpCall`): ``input`` [B, C, N], ``target`` [B, R, N]
    integer labels or [B, C, N] dense, ``edges`` [M + 1] hard edges or [M] soft centres, then ``num_bins, scheme,
    activation, target_kind, mode, moments, ignore_index, right``.

    Returns ``(count, sum_p, sum_y, sum_p2, sum_py, bad)``: ``count, sum_p`` (B, K, M), ``sum_y`` (B, K, R, M),
    ``sum_p2, sum_py`` (B, K, M) when ``moments`` else empty (0,), in float32 (float64 for float64 input), with
    ``K = C`` (marginal) or 1 (top-label); ``bad``, int64 (2,): label entries outside [0, C) that are not
    ``ignore_index``, and non-finite probability entries of the used voxels. Left-out entries (unused voxels,
    non-finite probabilities) contribute nothing and get gradient exactly 0. Sums are accumulated in float64 and
    rounded once, so the reference is as exact as the float32 output allows at any volume size.
    """
    g = check_args(*call, allow_float64=True)
    input, target, edges, _, scheme, activation, target_kind, mode, moments, ignore_index, right = call
    B, C, N, R, K, M = g
    out_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    acc = torch.float64
    dev = input.device
    labels = target_kind == TARGET_LABELS
    top = mode == MODE_TOP_LABEL
    mom_shape = (B, K, M) if moments else (0,)
    if C == 0:  # no class: empty (marginal) or zero (top-label) statistics, nothing counted
        z = lambda shape: input.new_zeros(shape, dtype=out_dtype)  # noqa: E731
        return (
            z((B, K, M)),
            z((B, K, M)),
            z((B, K, R, M)),
            z(mom_shape),
            z(mom_shape),
            torch.zeros(2, dtype=torch.int64, device=dev),
        )
    x = input.to(out_dtype)

    # Non-finite rule: an entry whose probability is NaN or +-inf is left out and gets gradient 0. The logits of
    # such entries are replaced by 0 before the differentiable activation, so no NaN reaches autograd (softmax:
    # a NaN / +inf logit makes every p of its voxel NaN, so the whole voxel is replaced, never a partial one).
    with torch.no_grad():
        finite = torch.isfinite(_activate(x, activation))  # [B, C, N]
        x_ok = finite.all(1, keepdim=True) if activation == ACT_SOFTMAX else finite
    p = _activate(torch.where(x_ok, x, torch.zeros((), dtype=x.dtype, device=dev)), activation)
    p = torch.where(finite, p, torch.zeros((), dtype=p.dtype, device=dev))

    if labels:
        lab = target.long()  # [B, R, N]
        in_range = (lab >= 0) & (lab < C)
        ignored = lab == ignore_index if ignore_index is not None else torch.zeros_like(in_range)
        bad_labels = (~in_range & ~ignored).sum()
        used = (in_range & ~ignored).all(1, keepdim=True)  # [B, 1, N]: every rater's label valid
        nonfinite = (~finite & used).sum()  # entries of unused voxels are not counted
    else:
        bad_labels = torch.zeros((), dtype=torch.int64, device=dev)
        used = torch.ones((B, 1, N), dtype=torch.bool, device=dev)
        nonfinite = (~finite).sum()
    bad = torch.stack([bad_labels, nonfinite]).to(torch.int64)

    if top:
        # confidence q = max_c p, class a = argmax (first maximum); the gradient flows to class a only
        a = p.detach().argmax(1, keepdim=True)  # [B, 1, N]
        q = p.gather(1, a)
        keep = used & finite.all(1, keepdim=True)
        if labels:
            y = (lab == a).to(acc).unsqueeze(1)  # [B, 1, R, N]
        else:
            y = target.gather(1, a).to(acc).unsqueeze(2)  # [B, 1, 1, N]
    else:
        q = p
        keep = used & finite
        if labels:
            classes = torch.arange(C, device=dev).view(1, C, 1, 1)
            y = (lab.unsqueeze(1) == classes).to(acc)  # [B, C, R, N]
        else:
            y = target.to(acc).unsqueeze(2)  # [B, C, 1, N]
    mask = keep.to(acc).expand(B, K, N)
    qa = q.to(acc)

    lo, w_lo, hi, w_hi = _membership(q, edges, M, scheme, right)
    w_lo = w_lo.to(acc) * mask
    w_hi = w_hi.to(acc) * mask

    def scatter(v_lo: torch.Tensor, v_hi: torch.Tensor) -> torch.Tensor:  # [B, K, N] -> [B, K, M]
        z = torch.zeros(B, K, M, dtype=acc, device=dev)
        return z.scatter_add(2, lo, v_lo).scatter_add(2, hi, v_hi)

    count = scatter(w_lo, w_hi)
    sum_p = scatter(w_lo * qa, w_hi * qa)
    zy = torch.zeros(B, K, R, M, dtype=acc, device=dev)
    lo_r, hi_r = lo.unsqueeze(2).expand(B, K, R, N), hi.unsqueeze(2).expand(B, K, R, N)
    sum_y = zy.scatter_add(3, lo_r, w_lo.unsqueeze(2) * y).scatter_add(3, hi_r, w_hi.unsqueeze(2) * y)
    if moments:
        ybar = y.mean(2)  # [B, K, N]: the rater mean
        q2 = qa * qa
        sum_p2 = scatter(w_lo * q2, w_hi * q2)
        sum_py = scatter(w_lo * qa * ybar, w_hi * qa * ybar)
    else:
        sum_p2 = sum_py = torch.zeros(0, dtype=acc, device=dev)
    return (
        count.to(out_dtype),
        sum_p.to(out_dtype),
        sum_y.to(out_dtype),
        sum_p2.to(out_dtype),
        sum_py.to(out_dtype),
        bad,
    )
