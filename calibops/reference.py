"""The pure-PyTorch specification of every calibops statistic, loss and metric (docs/usage.md "Semantics").

Everything here is vectorised (no Python loop over images, classes or bins), autograd-native and runs on any
device. Kernel backends must agree with these functions; tests compare them against each other.

Layers:
- :func:`bin_edges` / :func:`bin_centres`: the float32 edges and centres every backend bins with.
- :func:`binned_stats_prepared`: the (B, C, M) statistics from a prepared ``[B, C, N]`` input and target —
  the same signature and semantics as the kernel ops (docs/kernel_contract.md).
- :func:`ace_from_stats`: the mL1-ACE epilogue on the statistics (shared by every backend).
- :func:`calibration_errors_from_stats`: ECE / ACE / MCE from hard statistics (shared by every backend).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._contract import (
    ACT_NONE,
    ACT_SIGMOID,
    ACT_SOFTMAX,
    MODE_TOP_LABEL,
    SCHEME_HARD,
    SCHEME_SOFT,
    TARGET_LABELS,
    check_args,
)

__all__ = [
    "ACT_NONE",
    "ACT_SIGMOID",
    "ACT_SOFTMAX",
    "EPS32",
    "BinnedStats",
    "BinnedStatsMoments",
    "CalibrationErrors",
    "ace_from_stats",
    "bin_centres",
    "bin_edges",
    "binned_stats_prepared",
    "calibration_errors_from_stats",
    "reduce_loss",
    "scheme_edges",
]

EPS32 = float(torch.finfo(torch.float32).eps)


class BinnedStats(NamedTuple):
    """Binned statistics: per (image, class, bin) (marginal, (B, C', M)) or per (image, bin) (top-label, (B, M)).

    Hard binning: ``count`` = number of entries in the bin, ``sum_p`` = Σ q, ``sum_y`` = Σ y. Soft binning:
    ``count`` = Σ w (membership weights), ``sum_p`` = Σ w·q, ``sum_y`` = Σ w·y. With several raters
    (``multi_rater=True``) ``sum_y`` has a rater axis before the bins: (B, C', R, M) / (B, R, M).
    ``sum_p2`` (Σ w·q²) and ``sum_py`` (Σ w·q·ȳ, ȳ the rater mean) are None unless ``moments=True`` was asked
    (then the result is a :class:`BinnedStatsMoments`, which still unpacks as ``count, sum_p, sum_y``).
    """

    count: torch.Tensor
    sum_p: torch.Tensor
    sum_y: torch.Tensor

    sum_p2 = None  # class attributes, not fields: a BinnedStats unpacks into exactly three tensors
    sum_py = None


class BinnedStatsMoments(BinnedStats):
    """:class:`BinnedStats` that also carries the second moments ``sum_p2`` and ``sum_py`` (same shape as
    ``sum_p``). Unpacks, indexes and compares as the three-field tuple ``(count, sum_p, sum_y)``."""

    def __new__(cls, count, sum_p, sum_y, sum_p2, sum_py):
        self = super().__new__(cls, count, sum_p, sum_y)
        self.sum_p2 = sum_p2
        self.sum_py = sum_py
        return self

    def __getnewargs__(self):
        return (self.count, self.sum_p, self.sum_y, self.sum_p2, self.sum_py)

    def __repr__(self) -> str:
        return (
            f"BinnedStatsMoments(count={self.count!r}, sum_p={self.sum_p!r}, sum_y={self.sum_y!r}, "
            f"sum_p2={self.sum_p2!r}, sum_py={self.sum_py!r})"
        )


class _CalibrationErrorFields(NamedTuple):
    ece: torch.Tensor
    ace: torch.Tensor
    mce: torch.Tensor


class CalibrationErrors(_CalibrationErrorFields):
    """Expected (ECE), average (ACE) and maximum (MCE) calibration error, each (B, C') (or the shape asked).

    Also carries ``l2``, the L2 calibration error (count-weighted root mean square of the bin gaps,
    ``sqrt(Σ_j n_j gap_j² / Σ_j n_j)``, torchmetrics' ``norm="l2"``), as an *attribute*, not a field: the value
    still unpacks, indexes and compares as the three-field tuple ``(ece, ace, mce)``, so
    ``ece, ace, mce = calibration_errors(...)`` keeps working. ``l2`` is None when the producer did not compute it.
    """

    l2: torch.Tensor | None = None  # class-level default (a tuple rebuilt by _make/_replace has no instance l2)

    def __new__(cls, ece: torch.Tensor, ace: torch.Tensor, mce: torch.Tensor, l2: torch.Tensor | None = None):
        self = super().__new__(cls, ece, ace, mce)
        self.l2 = l2
        return self

    def __getnewargs__(self):
        return (self.ece, self.ace, self.mce, self.l2)

    def __repr__(self) -> str:
        return f"CalibrationErrors(ece={self.ece!r}, ace={self.ace!r}, mce={self.mce!r}, l2={self.l2!r})"

    def map(self, fn) -> CalibrationErrors:
        """Apply ``fn`` to every value (``l2`` included when present): ``errs.map(lambda t: t.float())``."""
        return CalibrationErrors(fn(self.ece), fn(self.ace), fn(self.mce), None if self.l2 is None else fn(self.l2))


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
    # soft: t = (number of centres strictly below q) - 1, in -1 .. M-1
    t = torch.bucketize(qd, edges.to(q.dtype), right=False) - 1
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


def binned_stats_prepared(
    input: torch.Tensor,  # [B, C, N]
    target: torch.Tensor,  # [B, R, N] integer labels, or [B, C, N] dense
    edges: torch.Tensor,  # [M + 1] hard edges, or [M] soft centres
    num_bins: int,
    scheme: int,
    activation: int,
    target_kind: int,
    mode: int,
    moments: bool,
    ignore_index: int | None,
    right: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the kernel op ``calibops::binned_stats`` (docs/kernel_contract.md, v2).

    Returns ``(count, sum_p, sum_y, sum_p2, sum_py, bad)``: ``count, sum_p`` (B, K, M), ``sum_y`` (B, K, R, M),
    ``sum_p2, sum_py`` (B, K, M) when ``moments`` else empty (0,), in float32 (float64 for float64 input), with
    ``K = C`` (marginal) or 1 (top-label); ``bad``, int64 (2,): label entries outside [0, C) that are not
    ``ignore_index``, and non-finite probability entries of the used voxels. Left-out entries (unused voxels,
    non-finite probabilities) contribute nothing and get gradient exactly 0. Sums are accumulated in float64 and
    rounded once, so the reference is as exact as the float32 output allows at any volume size.
    """
    g = check_args(
        input,
        target,
        edges,
        num_bins,
        scheme,
        activation,
        target_kind,
        mode,
        moments,
        ignore_index,
        right,
        allow_float64=True,
    )
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


def _bin_gaps(stats: BinnedStats, soft: bool, empty_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid bins, |S_p/n - S_y/n| with 0 on invalid bins), each (B, C, M)."""
    n = stats.count
    if soft:
        valid = (n >= empty_weight) & (n > 0)
        den = torch.where(valid, n, torch.ones_like(n))
        gap = (stats.sum_p / den - stats.sum_y / den).abs() * valid
    else:
        # hard counts carry no gradient; an empty bin has S_p = S_y = 0, so its gap is 0 without a mask
        valid = n > 0
        den = n.detach().clamp(min=1)
        gap = (stats.sum_p / den - stats.sum_y / den).abs()
    return valid, gap


def ace_from_stats(
    stats: BinnedStats,
    soft: bool = False,
    empty_weight: float = 0.01,
    ignore_empty_classes: bool = True,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-(image, class) marginal L1 ACE, (B, C), differentiable through ``stats``.

    ``ACE[b,c] = mean over valid bins of |S_p/n - S_y/n|`` (0 when no bin is valid); valid bins are ``n > 0``
    (hard) or ``W >= empty_weight`` and ``W > 0`` (soft). ``ignore_empty_classes`` multiplies by
    ``[Σ_i y[b,c,i] > 0]`` (= ``Σ_j S_y > 0``); ``weight`` (C,) multiplies per class.
    """
    valid, gap = _bin_gaps(stats, soft, empty_weight)
    with torch.no_grad():  # the per-(b, c) factor 1/K · mask · weight carries no gradient
        scale = 1.0 / valid.sum(-1).clamp(min=1).to(gap.dtype)
        if ignore_empty_classes:
            scale = scale * (stats.sum_y.sum(-1) > 0).to(gap.dtype)
        if weight is not None:
            scale = scale * weight.to(device=gap.device, dtype=gap.dtype).view(1, -1)
    return gap.sum(-1) * scale


def reduce_loss(per_class: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` over all B×C' entries (masked ones count as 0), ``"sum"``, or ``"none"`` (B, C').

    With no entry (B = 0) the mean is 0 like the sum (never NaN), so an empty batch adds nothing to a loss.
    """
    if reduction == "mean":
        if per_class.numel() == 0:
            return per_class.sum()
        return per_class.mean()
    if reduction == "sum":
        return per_class.sum()
    return per_class


def calibration_errors_from_stats(stats: BinnedStats) -> CalibrationErrors:
    """ECE, ACE, MCE (and L2, the ``l2`` attribute) per leading index from hard statistics (..., M); NaN where no
    bin has a voxel.

    ``ECE = Σ_j n_j gap_j / Σ_j n_j``, ``ACE = mean of gap_j over non-empty bins``,
    ``MCE = max of gap_j over non-empty bins``, ``L2 = sqrt(Σ_j n_j gap_j² / Σ_j n_j)``, ``gap_j = |S_p/n - S_y/n|``.
    Works for per-image stats (B, C, M) and for pooled (micro) stats (C, M) alike. No gradient.
    """
    with torch.no_grad():
        count = stats.count.double()
        s = BinnedStats(count, stats.sum_p.double(), stats.sum_y.double())
        valid, gap = _bin_gaps(s, False, 0.0)
        total = count.sum(-1)
        k = valid.sum(-1)
        nan = torch.full_like(total, float("nan"))
        ece = torch.where(total > 0, (count * gap).sum(-1) / total.clamp(min=1e-300), nan)
        ace = torch.where(k > 0, gap.sum(-1) / k.clamp(min=1), nan)
        mce = torch.where(k > 0, gap.amax(-1) if gap.shape[-1] > 0 else total, nan)
        l2 = torch.where(total > 0, ((count * gap * gap).sum(-1) / total.clamp(min=1e-300)).sqrt(), nan)
        out = stats.count.dtype
        return CalibrationErrors(ece.to(out), ace.to(out), mce.to(out), l2.to(out))
