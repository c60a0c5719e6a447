"""Epilogue accuracy (issue 13 item 7): is float32 enough for the statistics the loss epilogue reads?

The ops return float32 (B, C, M) statistics (the kernel contract); the loss epilogue takes each bin's gap
``|S_p/n - S_y/n|`` and its subgradient ``sign(gap)/n``. The float64 oracle is the reference backend run on
the *same* float32 probabilities cast to float64 (float64 sums, float64 epilogue).

Rule (docs/usage.md "Semantics"): a bin whose true gap is within the float32 rounding of its sums,
``|S_p - S_y| <= 2**-23 * max(S_p, S_y)`` (the band, one rounding of each sum plus the subtraction), may get
subgradient 0 or either sign instead of the oracle's; outside the band the sign is the oracle's. Inside the
band the oracle's sign is itself decided below the resolution of the probabilities: one float32 ulp of one
voxel's probability flips it (tested below), and the fused activation is only accurate to 1-2 ulp. The loss
value stays within the band divided by the number of bins averaged. Carrying float64 into the epilogue
would not change this (the rounding happens in the op's float32 output); measured below, it changes the loss
by < 1e-8 and no subgradient sign.

Error budget of the gradient comparison outside ties: each float32 statistic is rounded once (reference,
cpu: float64 accumulation) and the epilogue adds three float32 operations; the soft backward combines three
terms with cancellation. 16 float32 ulps of the largest gradient entry (2**-20 * max|g|) bounds all of it;
measured: about 1 ulp (hard) and 3-4 ulps (soft).
"""

from __future__ import annotations

import pytest
import torch

import calibops
from calibops import functional as F
from calibops.results import BinnedStats, ace_from_stats

BAND = 2.0**-23
GRAD_BUDGET = 2.0**-20


def _backends() -> list[str]:
    return [b for b in ("reference", "cpu", "triton") if calibops.available_backends()[b] is None]


def _loss_grad(p, y, backend, binning, epilogue_dtype=None):
    """Mean mL1-ACE of probabilities p (no activation), its gradient w.r.t. p, and the statistics."""
    x = p.clone().requires_grad_(True)
    s = F.binned_stats(x, y, binning=binning, backend=backend, validate=False)
    if epilogue_dtype is not None:
        s = BinnedStats(*(t.to(epilogue_dtype) for t in s))
    loss = ace_from_stats(s, soft=binning == "soft").mean()
    (g,) = torch.autograd.grad(loss, x)
    return loss.item(), g, s


def _oracle(p, y, binning):
    return _loss_grad(p.double(), y.double(), "reference", binning)


def _realistic(seed, B=2, C=4, N=24**3, calibrated=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(B, C, N, generator=g), 1)
    if calibrated:  # labels drawn from p: bins sit near gap 0, where ties would show
        lab = torch.multinomial(p.movedim(1, -1).reshape(-1, C), 1, generator=g).view(B, N)
    else:
        lab = torch.randint(0, C, (B, N), generator=g)
    return p, torch.nn.functional.one_hot(lab, C).movedim(-1, 1).float()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("binning", ["hard", "soft"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_float32_statistics_give_the_float64_subgradients_on_real_data(backend, binning, calibrated):
    p, y = _realistic(3 + calibrated, N=12**3 if backend == "triton" else 24**3, calibrated=calibrated)
    l32, g32, s32 = _loss_grad(p, y, backend, binning)
    l64, g64, s64 = _oracle(p, y, binning)
    valid = s64.count > 0
    gap64 = s64.sum_p - s64.sum_y
    gap32 = s32.sum_p.double() - s32.sum_y.double()
    outside = valid & (gap64.abs() > BAND * torch.maximum(s64.sum_p, s64.sum_y))
    assert bool(outside.any())
    assert torch.equal(torch.sign(gap32[outside]), torch.sign(gap64[outside]))  # the rule
    assert abs(l32 - l64) <= BAND  # K >= 1 bins averaged: within the band
    scale = g64.abs().max().item()
    torch.testing.assert_close(g32.double(), g64, rtol=0, atol=GRAD_BUDGET * scale)


def _near_tie(n, seed, direction):
    """One hard bin (p in (0.5, 0.55)) whose true gap is one float32 ulp of one probability, divided by n."""
    g = torch.Generator().manual_seed(seed)
    p = 0.505 + 0.04 * torch.rand(n, generator=g, dtype=torch.float64)
    k = round(p.sum().item())
    p = (p - (p.sum() - k) / n).float()
    rest = p.double().sum().item() - p[0].item()
    p0 = torch.tensor(k - rest, dtype=torch.float32)  # nearest float32 to a zero gap
    p[0] = torch.nextafter(p0, torch.tensor(direction, dtype=torch.float32))  # then one ulp off
    y = torch.zeros(n)
    y[torch.randperm(n, generator=g)[:k]] = 1
    return p.view(1, 1, n), y.view(1, 1, n)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "triton"])
@pytest.mark.parametrize("n", [101, 10007, 1000003])
@pytest.mark.parametrize("direction", [2.0, -2.0])
def test_near_ties_follow_the_stated_rule(backend, n, direction):
    p, y = _near_tie(n, n, direction)
    assert 0.5 < p.min().item() and p.max().item() < 0.55  # one bin of 20
    l32, g32, s32 = _loss_grad(p, y, backend, "hard")
    l32_f64epi, g32_f64epi, _ = _loss_grad(p, y, backend, "hard", torch.float64)
    l64, g64, s64 = _oracle(p, y, "hard")
    j = 10
    gap64 = (s64.sum_p - s64.sum_y)[0, 0, j].item()
    band = BAND * max(s64.sum_p[0, 0, j].item(), s64.sum_y[0, 0, j].item())
    assert 0 < abs(gap64) <= band  # a genuine tie below float32 resolution, nonzero in float64
    # the oracle's subgradient: sign(gap)/n on every voxel of the bin (mean over B*C = 1 entry, K = 1 bin)
    assert torch.allclose(g64, torch.full_like(g64, (1 if gap64 > 0 else -1) / n), rtol=1e-12, atol=0)
    # float32 statistics: a subgradient of |.| at the tie (0, or either sign), the same for every voxel
    v = g32[0, 0, 0].item()
    assert torch.all(g32 == v) and min(abs(v), abs(abs(v) - 1 / n)) <= 1e-6 / n
    # a float64 epilogue on the float32 statistics decides the same way (the rounding is in the op's output)
    assert torch.equal(g32_f64epi.float(), g32)
    assert abs(l32 - l64) <= band / n and abs(l32_f64epi - l64) <= band / n
    # inside the band the oracle's own sign hangs on one float32 ulp of one probability
    q = p.clone()
    q[0, 0, 0] = torch.nextafter(p[0, 0, 0], torch.tensor(-direction, dtype=torch.float32))
    q[0, 0, 0] = torch.nextafter(q[0, 0, 0], torch.tensor(-direction, dtype=torch.float32))
    _, g64_q, _ = _oracle(q, y, "hard")
    assert torch.sign(g64_q[0, 0, 0]) == -torch.sign(g64[0, 0, 0])


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_epilogue_gradcheck_against_its_own_formula(soft, masked):
    """The one-node epilogue (results._L1ACE) is the closed form of the plain-op formula: gradcheck in float64 on
    statistics away from the kinks (no gap at 0, no weight total at empty_weight), and the same values and
    gradients as the chain of ops it replaced."""
    g = torch.Generator().manual_seed(7 + soft + 2 * masked)
    B, C, M = 2, 3, 6
    n = torch.rand(B, C, M, generator=g, dtype=torch.float64) * 5 + 0.05
    n[0, 0, 2] = 0.0  # an empty bin
    sp = torch.rand(B, C, M, generator=g, dtype=torch.float64) * n
    sy = torch.rand(B, C, M, generator=g, dtype=torch.float64) * n
    sy[1, 2] = 0.0  # a class absent from image 1
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64) if masked else None
    # hard counts are integers and carry no gradient by definition: only soft weight totals are differentiated
    args = [t.clone().requires_grad_(soft or k > 0) for k, t in enumerate((n, sp, sy))]

    def fused(n_, sp_, sy_):
        return ace_from_stats(BinnedStats(n_, sp_, sy_), soft=soft, empty_weight=0.01, weight=w)

    def chain(n_, sp_, sy_):  # the v0.2 formula, op by op
        if soft:
            valid = (n_ >= 0.01) & (n_ > 0)
            den = torch.where(valid, n_, torch.ones_like(n_))
            gap = (sp_ / den - sy_ / den).abs() * valid
        else:
            valid = n_ > 0
            den = n_.detach().clamp(min=1)
            gap = (sp_ / den - sy_ / den).abs()
        scale = (1.0 / valid.sum(-1).clamp(min=1).double()) * (sy_.detach().sum(-1) > 0).double()
        if w is not None:
            scale = scale * w.view(1, -1)
        return gap.sum(-1) * scale.detach()

    # gradcheck away from the kinks: an empty bin (S_p = S_y = 0) sits on the kink of |.|, and a class with
    # S_y = 0 on the jump of the ignore_empty_classes mask
    smooth = [a.detach().clone() for a in args]
    smooth[0][0, 0, 2] = 1.0
    smooth[1][0, 0, 2], smooth[2][0, 0, 2] = 0.7, 0.2
    smooth[2][1, 2] = 0.3 * smooth[0][1, 2]
    assert torch.autograd.gradcheck(fused, tuple(t.requires_grad_(a.requires_grad) for t, a in zip(smooth, args)))
    up = torch.randn(B, C, generator=g, dtype=torch.float64)
    diff = [a for a in args if a.requires_grad]
    got = torch.autograd.grad((fused(*args) * up).sum(), diff, allow_unused=True)
    want = torch.autograd.grad((chain(*args) * up).sum(), diff, allow_unused=True)
    torch.testing.assert_close(fused(*args), chain(*args), rtol=1e-14, atol=0)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
