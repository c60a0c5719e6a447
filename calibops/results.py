"""Result types and the formulas applied to binned statistics: the mL1-ACE epilogue and ECE / ACE / MCE / L2.

These run after any backend's statistics op (plain PyTorch on (B, C, M) tensors, differentiable where a loss
needs it), so every backend shares them. The statistics themselves are specified by :mod:`calibops.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "BinnedStats",
    "BinnedStatsMoments",
    "CalibrationErrors",
    "ace_from_stats",
    "bin_gaps",
    "calibration_errors_from_stats",
    "class_factor",
    "l1ace_backward",
    "l1ace_forward",
    "reduce_loss",
]


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


def bin_gaps(stats: BinnedStats, soft: bool, empty_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def l1ace_forward(
    count: torch.Tensor,
    sum_p: torch.Tensor,
    sum_y: torch.Tensor,
    soft: bool,
    empty_weight: float,
    factor: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The mL1-ACE epilogue without autograd: ``Σ_j |S_p/n - S_y/n| · valid_j · scale`` per (b, c) from (B, C, M)
    statistics, and the tensors :func:`l1ace_backward` needs. ``scale`` = 1/K (valid bins) times ``factor``
    (the class mask and weight, (B, C) or (1, C), constant), when given."""
    if soft:
        valid = (count >= empty_weight) & (count > 0)
        den = torch.where(valid, count, torch.ones_like(count))
    else:  # an empty bin has S_p = S_y = 0, so its gap is 0 without a mask
        valid = count > 0
        den = count.clamp(min=1)
    diff = sum_p / den - sum_y / den
    gap = diff.abs() * valid if soft else diff.abs()
    scale = valid.sum(-1).clamp(min=1).to(gap.dtype).reciprocal()
    if factor is not None:
        scale = scale * factor
    return gap.sum(-1) * scale, (diff, den, valid, scale, sum_p, sum_y)


def l1ace_backward(
    grad: torch.Tensor, saved: tuple[torch.Tensor, ...], soft: bool, count_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The closed-form gradients ``(dL/dn or None, dL/dS_p, dL/dS_y)`` of :func:`l1ace_forward`, ``grad`` the
    upstream (B, C); ``dL/dn`` only with ``count_grad`` (soft binning: the weight total depends on the input)."""
    diff, den, valid, scale, sum_p, sum_y = saved
    g = (grad * scale).unsqueeze(-1) * torch.sign(diff)
    if soft:
        g = g * valid
    g_p = g / den
    g_count = -(g_p * (sum_p - sum_y)) / den if (soft and count_grad) else None
    return g_count, g_p, -g_p


class _L1ACE(torch.autograd.Function):
    """The mL1-ACE epilogue as one autograd node: forward :func:`l1ace_forward`, backward its closed form
    :func:`l1ace_backward` (a chain of a dozen small ops and their autograd nodes would cost more than the
    statistics kernel itself on small inputs).

    Gradients (``g`` the upstream per (b, c), ``s = sign(S_p/n - S_y/n)`` on valid bins, 0 elsewhere):
    ``dL/dS_p = g·scale·s/n``, ``dL/dS_y = -dL/dS_p``, and with soft binning (the weight total ``n`` depends on
    the input) ``dL/dn = -g·scale·s·(S_p - S_y)/n²``. Hard counts carry no gradient. ``scale`` = 1/K (valid bins)
    times the class mask and weight, constant.
    """

    @staticmethod
    def forward(ctx, count, sum_p, sum_y, soft: bool, empty_weight: float, factor):  # [B, C, M] x3, [B, C]
        out, saved = l1ace_forward(count, sum_p, sum_y, soft, empty_weight, factor)
        ctx.soft = soft
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = l1ace_backward(grad, ctx.saved_tensors, ctx.soft, ctx.needs_input_grad[0])
        return (*grads, None, None, None)


def class_factor(sum_y: torch.Tensor, ignore_empty_classes: bool, weight: torch.Tensor | None) -> torch.Tensor | None:
    """The constant per-(image, class) multiplier of the mL1-ACE: ``[Σ_j S_y > 0]`` (``ignore_empty_classes``)
    times ``weight`` (C,); None when neither applies."""
    factor = None
    if ignore_empty_classes:
        factor = (sum_y.detach().sum(-1) > 0).to(sum_y.dtype)
    if weight is not None:
        w = weight.to(device=sum_y.device, dtype=sum_y.dtype).view(1, -1)
        factor = w if factor is None else factor * w
    return factor


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
    ``[Σ_i y[b,c,i] > 0]`` (= ``Σ_j S_y > 0``); ``weight`` (C,) multiplies per class. One autograd node
    (:class:`_L1ACE`); hard counts carry no gradient.
    """
    count, sum_p, sum_y = stats
    factor = class_factor(sum_y, ignore_empty_classes, weight)
    return _L1ACE.apply(count if soft else count.detach(), sum_p, sum_y, soft, float(empty_weight), factor)


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
        valid, gap = bin_gaps(s, False, 0.0)
        total = count.sum(-1)
        k = valid.sum(-1)
        nan = torch.full_like(total, float("nan"))
        ece = torch.where(total > 0, (count * gap).sum(-1) / total.clamp(min=1e-300), nan)
        ace = torch.where(k > 0, gap.sum(-1) / k.clamp(min=1), nan)
        mce = torch.where(k > 0, gap.amax(-1) if gap.shape[-1] > 0 else total, nan)
        l2 = torch.where(total > 0, ((count * gap * gap).sum(-1) / total.clamp(min=1e-300)).sqrt(), nan)
        out = stats.count.dtype
        return CalibrationErrors(ece.to(out), ace.to(out), mce.to(out), l2.to(out))
