"""Evaluation formulas on binned statistics: the protocols of docs/evaluation.md as small functions.

Nothing here runs a kernel or reads voxels: every function takes statistics (``BinnedStats`` from
:func:`calibops.functional.binned_stats`, per image or summed over a data set) or per-image numbers, so the
functional API, :class:`calibops.DatasetCalibration`, the CLI and the integrations share one formula each.

- :func:`pool_stats`: sum per-image statistics over images (the pooled / "micro" population).
- :func:`brier_decomposition`: Brier score and its Murphy decomposition from statistics with moments.
- :func:`crps_gaussian` / :func:`crps_curvas`: the CRPS of a value against a Gaussian, in closed form and as the
  CURVAS 2024 evaluation's truncated integral of an interpolated CDF.
- :func:`consensus_masks`: consensus / dissensus regions of several raters' label maps.
- :func:`rater_label_counts`: exact (int64) per-rater class volumes of label maps, in voxels.
- :func:`adaptive_calibration_errors`: equal-mass (adaptive) binning from a fine pooled histogram.
- :func:`bootstrap_ci`: seeded percentile bootstrap over images.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .results import BinnedStats, BinnedStatsMoments, CalibrationErrors, calibration_errors_from_stats

__all__ = [
    "MAX_BOOTSTRAP_SAMPLES",
    "MIN_BOOTSTRAP_IMAGES",
    "BootstrapWarning",
    "BrierDecomposition",
    "ConfidenceInterval",
    "ConsensusMasks",
    "adaptive_calibration_errors",
    "bootstrap_ci",
    "bootstrap_means",
    "check_bootstrap_args",
    "brier_decomposition",
    "consensus_masks",
    "crps_curvas",
    "crps_gaussian",
    "pool_stats",
    "rater_label_counts",
]


def pool_stats(stats: BinnedStats, dim: int = 0) -> BinnedStats:
    """Statistics summed over ``dim`` (default: the image axis) in float64: the pooled population.

    Every field (moments included when present) is summed; the result feeds
    :func:`calibops.reference.calibration_errors_from_stats` for pooled ("micro") errors, which is what
    torchmetrics computes on flattened voxels.
    """
    parts = [t.double().sum(dim) for t in stats]
    if isinstance(stats, BinnedStatsMoments):
        return BinnedStatsMoments(*parts, stats.sum_p2.double().sum(dim), stats.sum_py.double().sum(dim))
    return BinnedStats(*parts)


class BrierDecomposition(NamedTuple):
    """Brier score and its decomposition, each of the statistics' leading shape (NaN where no voxel).

    ``brier = reliability - resolution + uncertainty + within_bin_variance - within_bin_covariance`` holds
    exactly (up to rounding). ``reliability - resolution + uncertainty`` is Murphy's decomposition of the
    forecasts *replaced by their bin means*; the last two terms are what binning changes, computed exactly from
    the second moments ``sum_p2`` (``Σ q²``) and ``sum_py`` (``Σ q ȳ``).
    """

    brier: torch.Tensor
    reliability: torch.Tensor
    resolution: torch.Tensor
    uncertainty: torch.Tensor
    within_bin_variance: torch.Tensor
    within_bin_covariance: torch.Tensor


def brier_decomposition(stats: BinnedStats, sum_y2: torch.Tensor | None = None) -> BrierDecomposition:
    """Brier score and decomposition from hard statistics with moments (``binned_stats(..., moments=True)``).

    ``stats``: (..., M) fields, ``sum_y`` either (..., M) or with a rater axis (..., R, M) (then every term is
    the mean over raters of the per-rater term, which is what the rater-averaged Brier score decomposes into).
    ``sum_y2``: ``Σ y²`` per leading index (...), needed only for soft targets; by default the targets are
    binary (labels or one-hot), so ``Σ y² = Σ y``. With ``N = Σ_j n_j``, ``q̄_j = S_p/n``, ``ȳ_j = S_y/n``,
    ``ō = Σ S_y / N``:

    - ``reliability = Σ_j n_j (q̄_j - ȳ_j)² / N``, ``resolution = Σ_j n_j (ȳ_j - ō)² / N``,
      ``uncertainty = Σ y² / N - ō²`` (= ``ō(1 - ō)`` for binary targets);
    - ``within_bin_variance = (Σ q² - Σ_j n_j q̄_j²) / N``,
      ``within_bin_covariance = 2 (Σ q ȳ - Σ_j n_j q̄_j ȳ_j) / N``.

    Computed in float64, no gradient.
    """
    if stats.sum_p2 is None or stats.sum_py is None:
        raise ValueError("brier_decomposition needs the second moments: compute the statistics with moments=True")
    with torch.no_grad():
        n = stats.count.double()
        sp = stats.sum_p.double()
        sy = stats.sum_y.double()
        rated = sy.dim() == n.dim() + 1
        if not rated:
            sy = sy.unsqueeze(-2)  # one rater
        if sy.shape[:-2] != n.shape[:-1] or sy.shape[-1] != n.shape[-1]:
            raise ValueError(f"stats.sum_y {tuple(stats.sum_y.shape)} does not fit stats.count {tuple(n.shape)}")
        N = n.sum(-1)
        ok = N > 0
        Nd = N.clamp(min=1e-300)
        den = n.clamp(min=1e-300)
        qbar = torch.where(n > 0, sp / den, torch.zeros_like(sp))
        ybar = torch.where(n.unsqueeze(-2) > 0, sy / den.unsqueeze(-2), torch.zeros_like(sy))  # (..., R, M)
        o = sy.sum(-1) / Nd.unsqueeze(-1)  # (..., R)
        rel = (n.unsqueeze(-2) * (qbar.unsqueeze(-2) - ybar) ** 2).sum(-1).mean(-1) / Nd
        res = (n.unsqueeze(-2) * (ybar - o.unsqueeze(-1)) ** 2).sum(-1).mean(-1) / Nd
        y2 = sy.sum(-1).mean(-1) if sum_y2 is None else sum_y2.double()
        unc = y2 / Nd - (o**2).mean(-1)
        wbv = (stats.sum_p2.double().sum(-1) - (n * qbar**2).sum(-1)) / Nd
        ybar_mean = ybar.mean(-2)  # bin means of the rater-mean target
        wbc = 2 * (stats.sum_py.double().sum(-1) - (n * qbar * ybar_mean).sum(-1)) / Nd
        brier = (stats.sum_p2.double().sum(-1) - 2 * stats.sum_py.double().sum(-1) + y2) / Nd
        nan = torch.full_like(N, float("nan"))
        parts = [torch.where(ok, t, nan) for t in (brier, rel, res, unc, wbv, wbc)]
    return BrierDecomposition(*parts)


_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def crps_gaussian(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """CRPS of ``value`` against ``N(mean, std²)``: ``σ [z (2Φ(z) - 1) + 2φ(z) - 1/√π]``, ``z = (v - μ)/σ``.

    ``std == 0`` (a point mass) gives ``|v - μ|``, the limit of the formula. Broadcasts; differentiable w.r.t.
    ``value`` (and the parameters where ``std > 0``); computed in ``value``'s dtype.
    """
    std = torch.as_tensor(std, dtype=value.dtype, device=value.device)
    mean = torch.as_tensor(mean, dtype=value.dtype, device=value.device)
    point = std <= 0
    s = torch.where(point, torch.ones_like(std), std)
    z = (value - mean) / s
    cdf = torch.special.ndtr(z)
    crps = s * (z * (2 * cdf - 1) + 2 * _phi(z) - _INV_SQRT_PI)
    return torch.where(point, (value - mean).abs(), crps)


def _curvas_grid(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The CURVAS CDF nodes in standard units: 100 equispaced z from Φ⁻¹(0.01) to Φ⁻¹(0.99) and Φ there."""
    lo = torch.special.ndtri(torch.tensor(0.01, dtype=torch.float64))
    z = torch.linspace(float(lo), float(-lo), 100, dtype=torch.float64)
    return z.to(device=device, dtype=dtype), torch.special.ndtr(z).to(device=device, dtype=dtype)


def crps_curvas(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The CRPS as the CURVAS 2024 evaluation computes it (for comparability with its published numbers).

    ``∫_{μ-3σ}^{μ+3σ} (F̃(x) - H(x - v))² dx`` where ``F̃`` is the Gaussian CDF linearly interpolated between
    100 equispaced points from its 1 % to its 99 % quantile, 0 below and 1 above them, and ``H`` the step at the
    predicted value ``v``. The challenge code integrates this numerically; ``F̃ - H`` is piecewise linear, so here
    the integral is evaluated exactly (each piece ``Δ (g₀² + g₀g₁ + g₁²)/3``). In standard units ``z = (x - μ)/σ``
    the value is ``σ · G((v - μ)/σ)`` with one fixed function ``G``. Differences from the closed form
    (:func:`crps_gaussian`): the tails beyond ``±3σ`` are dropped (so a prediction far outside contributes at most
    ``6σ``, not ``|v - μ|``), the interpolation and the 1 %/99 % cut-offs bias it; ``σ = 0`` gives 0 whatever
    ``v`` (the interval is empty). Float64, no gradient.
    """
    with torch.no_grad():
        v = torch.as_tensor(value, dtype=torch.float64)
        mu = torch.as_tensor(mean, dtype=torch.float64, device=v.device)
        sd = torch.as_tensor(std, dtype=torch.float64, device=v.device)
        v, mu, sd = torch.broadcast_tensors(v, mu, sd)
        point = sd <= 0
        s = torch.where(point, torch.ones_like(sd), sd)
        zv = ((v - mu) / s).clamp(-3.0, 3.0).reshape(-1, 1)
        gz, gF = _curvas_grid(torch.float64, v.device)
        K = zv.shape[0]
        ends = torch.tensor([-3.0, 3.0], dtype=torch.float64, device=v.device).expand(K, 2)
        pts, _ = torch.sort(torch.cat([gz.expand(K, -1), ends, zv], 1), 1)  # (K, 103) breakpoints in [-3, 3]
        a, b = pts[:, :-1], pts[:, 1:]
        mid = 0.5 * (a + b)
        # F̃ on each piece: 0 below the first node, 1 above the last, linear interpolation in between
        inside = (mid >= gz[0]) & (mid <= gz[-1])
        k = torch.searchsorted(gz, mid.contiguous()).clamp(1, gz.numel() - 1) - 1
        z0, z1, f0, f1 = gz[k], gz[k + 1], gF[k], gF[k + 1]

        def F(t: torch.Tensor) -> torch.Tensor:
            lin = f0 + (t - z0) * (f1 - f0) / (z1 - z0)
            return torch.where(inside, lin, torch.where(mid > gz[-1], torch.ones_like(t), torch.zeros_like(t)))

        h = (mid > zv).to(torch.float64)  # the step at the prediction, constant on each piece
        g0, g1 = F(a) - h, F(b) - h
        G = ((b - a) * (g0 * g0 + g0 * g1 + g1 * g1) / 3.0).sum(1).view(v.shape)
        return torch.where(point, torch.zeros_like(G), s * G)


class ConsensusMasks(NamedTuple):
    """Per (image, class) regions of R raters' label maps, each bool (B, C, *spatial).

    ``foreground``: every rater that labelled the voxel gives the class; ``background``: none of them gives it;
    ``dissensus``: they disagree; ``unlabelled``: no rater labelled the voxel (every rater's label is
    ``ignore_index``), so it is neither agreed foreground nor agreed background. The four partition the voxels.
    """

    foreground: torch.Tensor
    background: torch.Tensor
    dissensus: torch.Tensor
    unlabelled: torch.Tensor


def consensus_masks(target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> ConsensusMasks:
    """Consensus and dissensus regions of ``target`` (B, R, *spatial) integer label maps, per class 0..C-1.

    A rater whose label at a voxel is ``ignore_index`` does not vote there; the raters that labelled it decide.
    """
    if not isinstance(target, torch.Tensor) or target.dim() < 2 or target.is_floating_point():
        raise TypeError("target must be an integer tensor of R rater label maps (B, R, *spatial)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    classes = torch.arange(num_classes, device=target.device).view(1, 1, num_classes, *([1] * (target.dim() - 2)))
    lab = target.long().unsqueeze(2)  # (B, R, 1, *spatial)
    hit = lab == classes  # (B, R, C, *spatial)
    if ignore_index is None:
        fg = hit.all(1)
        bg = (~hit).all(1)
        none = torch.zeros_like(fg)
    else:
        voting = lab != ignore_index  # (B, R, 1, *spatial)
        labelled = voting.any(1).expand_as(hit[:, 0])
        fg = (hit | ~voting).all(1) & labelled
        bg = (~hit | ~voting).all(1) & labelled
        none = ~labelled
    return ConsensusMasks(fg, bg, ~(fg | bg | none), none)


_COUNT_CHUNK = 1 << 22  # label entries read per step by rater_label_counts (bounded temporaries)


def rater_label_counts(
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact voxel counts ``#{i : label_r(i) = c}`` of R raters' label maps, int64 (B, C, R).

    ``target``: (B, R, *spatial) integer (or bool, or integer-valued float) label maps. A voxel is counted only
    where *every* rater's label lies in [0, C) and is not ``ignore_index`` (the statistics' rule for several
    raters, docs/statistics.md). ``keep`` (optional, bool (B, C, N) with N the voxels per map): a per-class voxel
    mask; a rater's label ``c`` at voxel ``i`` is counted only where ``keep[b, c, i]`` (the statistics leave out
    non-finite probability entries this way). Counted with ``bincount`` over (rater, label) in chunks of the
    voxels: no (B, R, C, N) one-hot and no float rounding, whatever the volume (float32 sums stop counting exactly
    above 2**24 voxels).
    """
    if not isinstance(target, torch.Tensor) or target.dim() < 2 or target.is_complex():
        raise TypeError("target must be a tensor of R rater label maps (B, R, *spatial)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    B, R = target.shape[0], target.shape[1]
    C = num_classes
    t = target.reshape(B, R, -1)
    N = t.shape[-1]
    if keep is not None and tuple(keep.shape) != (B, C, N):
        raise ValueError(f"keep must be a bool mask (B, C, N) = ({B}, {C}, {N}), got {tuple(keep.shape)}")
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        t = t.to(torch.int64)  # float labels (integer-valued): truncated like the statistics do
    lo, hi = int(torch.iinfo(t.dtype).min), int(torch.iinfo(t.dtype).max)
    # the label dtype is kept (a uint8 chunk is read as uint8): converting 10^8 labels to int64 costs more than
    # counting them; the slot C of left-out voxels needs C <= the dtype's max, else the chunk is widened
    work = t.dtype if C <= hi else torch.int32 if C < 2**31 - 1 else torch.int64
    ignore = ignore_index if (ignore_index is not None and lo <= ignore_index <= hi) else None
    out = torch.zeros(B, R, C + 1, dtype=torch.int64, device=target.device)
    step = max(1, _COUNT_CHUNK // max(R, 1))
    slot = None  # the left-out slot C as a 0-d tensor of the working dtype
    for b in range(B):
        for s in range(0, N, step):
            lab = t[b, :, s : s + step]  # (R, n)
            counted = None  # (n,): every rater's label valid (None: all are), row by row (contiguous reads)
            for r in range(R):
                row = lab[r]
                valid = row < C if C <= hi else None
                if lo < 0:
                    valid = row >= 0 if valid is None else valid.logical_and_(row >= 0)
                if ignore is not None:
                    valid = row != ignore if valid is None else valid.logical_and_(row != ignore)
                if valid is not None:
                    counted = valid if counted is None else counted.logical_and_(valid)
            if counted is not None and bool(counted.all()):
                counted = None  # the common case: no label to leave out, no masking pass
            kb = keep[b, :, s : s + step] if keep is not None else None  # (C, n)
            for r in range(R):
                lr = lab[r].to(work)
                if counted is not None or kb is not None:
                    if slot is None:
                        slot = torch.full((), C, dtype=work, device=lr.device)
                    if counted is not None:  # left-out voxels go to the extra slot C
                        lr = torch.where(counted, lr, slot)
                    if kb is not None:  # keep the entry at the rater's label
                        at_label = kb.gather(0, lr.clamp(max=C - 1).to(torch.int64).unsqueeze(0))[0]
                        lr = torch.where(at_label, lr, slot)
                out[b, r] += torch.bincount(lr, minlength=C + 1)[: C + 1]
    return out[..., :C].transpose(1, 2).contiguous()


def adaptive_calibration_errors(fine: BinnedStats, num_bins: int) -> tuple[CalibrationErrors, torch.Tensor]:
    """Calibration errors over ``num_bins`` equal-mass (adaptive) bins built from fine pooled statistics.

    ``fine``: pooled hard statistics (..., F) over ``F`` fine uniform bins (e.g. F = 1000 from
    ``binned_stats(..., num_bins=1000)`` summed over images, or ``DatasetCalibration(..., adaptive_bins=...)``).
    Each adaptive bin is a run of consecutive fine bins; fine bin ``f`` goes to adaptive bin
    ``floor(M · (cumulative count before f + count_f / 2) / N)``, so every adaptive bin holds about ``N/M``
    entries, up to the granularity of the fine bins (an adaptive edge can only sit on a fine edge: entries inside
    one fine bin are never split; with F ≫ M the difference to sorting every voxel is at most one fine bin's
    mass per edge). Returns ``(errors, edges)``: :class:`CalibrationErrors` of the leading shape and the
    adaptive bins' upper fine-bin index (..., M) (-1 for an adaptive bin that got no fine bin).
    """
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    with torch.no_grad():
        n = fine.count.double()
        F = n.shape[-1]
        total = n.sum(-1, keepdim=True)
        before = n.cumsum(-1) - n
        centre = (before + 0.5 * n) / total.clamp(min=1e-300)
        idx = (centre * num_bins).floor().clamp(0, num_bins - 1).long()
        lead = n.shape[:-1]

        def regroup(t: torch.Tensor) -> torch.Tensor:
            z = torch.zeros(*t.shape[:-1], num_bins, dtype=torch.float64, device=t.device)
            i = idx if t.dim() == idx.dim() else idx.unsqueeze(-2).expand(*t.shape)
            return z.scatter_add(-1, i, t.double())

        stats = BinnedStats(regroup(n), regroup(fine.sum_p), regroup(fine.sum_y))
        fine_index = torch.arange(F, device=n.device).expand(*lead, F)
        upper = torch.full((*lead, num_bins), -1, dtype=torch.int64, device=n.device)
        upper = upper.scatter_reduce(-1, idx, torch.where(n > 0, fine_index, -1), reduce="amax")
    return calibration_errors_from_stats(stats), upper


MAX_BOOTSTRAP_SAMPLES = 100_000
"""Upper limit of ``num_samples`` (the CLI's ``--bootstrap-samples``): the percentile interval settles long before."""

MIN_BOOTSTRAP_IMAGES = 10
"""Fewer images than this behind an interval draw a :class:`BootstrapWarning`: a percentile bootstrap over n images
can only reshuffle n values (one image gives a zero-width interval, two give [min, max]), so its coverage is far
below the nominal level."""

_BOOTSTRAP_CHUNK = 1 << 23  # resampled values held in memory at once (64 MiB of float64)


class BootstrapWarning(UserWarning):
    """A bootstrap interval rests on fewer than :data:`MIN_BOOTSTRAP_IMAGES` images."""


def check_bootstrap_args(num_samples: Any, level: Any, seed: Any) -> tuple[int, float, int]:
    """``(num_samples, level, seed)`` checked and as Python numbers: ``num_samples`` an integer (NumPy integers
    too) in [1, :data:`MAX_BOOTSTRAP_SAMPLES`], ``level`` a number in (0, 1), ``seed`` an integer in [0, 2**63)
    (group ``k`` of a stratified bootstrap draws with ``seed + 1 + k``, which must stay a valid 64-bit seed).
    Raises ``TypeError`` / ``ValueError`` naming the argument."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__} {num_samples!r}")
    if not 1 <= int(num_samples) <= MAX_BOOTSTRAP_SAMPLES:
        raise ValueError(f"num_samples must be between 1 and {MAX_BOOTSTRAP_SAMPLES}, got {int(num_samples)}")
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < float(level) < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {int(seed)}")
    return int(num_samples), float(level), int(seed)


def bootstrap_means(values: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """``num_samples`` resampled NaN-skipping means over the first axis of ``values``, float64
    ``(num_samples, *values.shape[1:])``. Each resample draws ``n`` image indices with replacement from
    ``generator`` (on the CPU), in chunks of resamples so that at most about ``2**23`` resampled values are held
    at once; the draws are those of one ``torch.randint(0, n, (num_samples, n))`` call, chunked or not."""
    n = values.shape[0]
    per = n * max(1, math.prod(values.shape[1:]))
    rows = max(1, _BOOTSTRAP_CHUNK // max(per, 1))
    out = []
    for start in range(0, num_samples, rows):
        k = min(rows, num_samples - start)
        idx = torch.randint(0, n, (k, n), generator=generator)
        out.append(values[idx.to(values.device)].double().nanmean(1))
    return torch.cat(out)


class _ConfidenceIntervalFields(NamedTuple):
    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor


class ConfidenceInterval(_ConfidenceIntervalFields):
    """A percentile bootstrap interval: the estimate on all images and the (lower, upper) quantiles.

    Also carries ``num_images``, int64: the images behind each entry (those where the value is not NaN; for a
    custom statistic, all images), as an *attribute*, so ``estimate, lower, upper = ci`` keeps working. None when
    the producer did not count them.
    """

    num_images: torch.Tensor | None = None

    def __new__(
        cls, estimate: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, num_images: torch.Tensor | None = None
    ):
        self = super().__new__(cls, estimate, lower, upper)
        self.num_images = num_images
        return self

    def __getnewargs__(self):
        return (self.estimate, self.lower, self.upper, self.num_images)


def bootstrap_ci(
    values: torch.Tensor,
    statistic: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    num_samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Seeded percentile bootstrap over the first axis (images) of ``values``.

    ``statistic`` maps a resampled ``values`` (same shape) to a tensor; default: the mean over images ignoring
    NaN. The ``num_samples`` resamples draw image indices with replacement from ``torch.Generator`` seeded with
    ``seed`` on the CPU, so the interval is reproducible on any machine. Returns the estimate on all images and the
    ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the resampled statistics, with ``num_images`` (the images
    behind each entry). Arguments are checked by :func:`check_bootstrap_args` (``num_samples`` at most
    :data:`MAX_BOOTSTRAP_SAMPLES`); the default statistic resamples in bounded chunks (:func:`bootstrap_means`).
    Fewer than :data:`MIN_BOOTSTRAP_IMAGES` images behind an entry give a :class:`BootstrapWarning`.
    """
    num_samples, level, seed = check_bootstrap_args(num_samples, level, seed)
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    default = statistic is None
    if statistic is None:
        statistic = lambda v: v.nanmean(0)  # noqa: E731
    n = values.shape[0] if values.dim() > 0 else 0
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one image")
    g = torch.Generator().manual_seed(seed)
    if default:  # vectorised, in bounded chunks of resamples
        draws = bootstrap_means(values, num_samples, g)
        images = (~torch.isnan(values)).sum(0) if values.is_floating_point() else torch.full(values.shape[1:], n)
    else:
        draws = torch.stack(
            [statistic(values[i.to(values.device)]) for i in torch.randint(0, n, (num_samples, n), generator=g)]
        ).double()
        images = torch.tensor(n)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=draws.device)
    lo, hi = torch.nanquantile(draws, q, dim=0)
    fewest = int(images.min()) if images.numel() else n
    if fewest < MIN_BOOTSTRAP_IMAGES:
        what = (
            "no value, a NaN interval"
            if fewest == 0
            else "a zero-width interval"
            if fewest == 1
            else "an interval far narrower than its nominal level"
        )
        warnings.warn(
            f"bootstrap interval from {fewest} image(s) (fewer than {MIN_BOOTSTRAP_IMAGES}): {what}; report it with "
            "its number of images, or pool more images",
            BootstrapWarning,
            stacklevel=2,
        )
    return ConfidenceInterval(statistic(values).double(), lo, hi, images.to(torch.int64))
