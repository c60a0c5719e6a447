"""The kink rule of docs/kernel_contract.md ("Kinks: where backends may legitimately take different sides"), on
every available backend (tests/_kernel_backends.py).

1. Probabilities given directly: exactly on every hard edge (right=False and True) and soft centre, and one
   float32 step either side: every backend takes the contract's side. Hard counts equal exactly; sums and
   gradients within float32 rounding (rtol 2e-5 of |stat| + count, as tests/test_cuda_backend.py derives for the
   GPU kernels' float32 runs; gradients rtol 1e-5 + 1e-6 of the largest). Taking the other side of a centre or
   an edge changes a gradient by O(1) relative, far outside these.
2. From logits whose reference probabilities sit within a few ulp of edges and centres: a backend's p may differ
   from the reference's by up to ``δ = (C + 8)·eps32·p + 2^-126``, so entries within δ of a kink may take the
   other side. The test counts those entries and bounds every difference by them, as the contract states:
   hard count / sum_y of a bin by the near-kink entries next to it (sum_p also by Σ δ), soft statistics by
   Σ δ / d (+ Σ δ), the gradient of an entry near a kink by the jump J of the reference's g_p across that kink
   (evaluated on both sides at kink ± 2δ), passed through the activation (softmax: at most the sum of J over
   the voxel's near classes; sigmoid: J/4); every other entry gets the reference gradient within rounding.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from calibops.reference import bin_centres, bin_edges, binned_stats_prepared

from . import _kernel_backends as kb

EPS32 = float(torch.finfo(torch.float32).eps)
TINY = 2.0**-126
STAT_RTOL = 2e-5
BACKENDS = kb.backend_names()
KERNELS = [b for b in BACKENDS if b != "reference"]


def _edges(M, soft):
    return bin_centres(M) if soft else bin_edges(M)


def _grads(B, C, M, seed=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, C, M, generator=g) * s for s in (0.5, 1.0, 0.7))


def _check_stats(got, ref, N, M, soft, extra=None, what=""):
    """got vs ref within float32 rounding (+ ``extra`` (3, B, C, M) allowed by the kink rule)."""
    rc = ref[0]
    atol = 8 * EPS32 * (N + M * N**0.5) if soft else 0.0
    for k, (nm, a, b) in enumerate(zip(("count", "sum_p", "sum_y"), got[:3], ref[:3])):
        tol = STAT_RTOL * (b.abs() + rc.abs()) + atol + 1e-6
        if extra is not None:
            tol = tol + extra[k]
        err = (a.double() - b.double()).abs()
        assert bool((err <= tol).all()), f"{what}: {nm} off by {float((err / tol).max()):.3g}x its tolerance"


@pytest.mark.parametrize("soft,right", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_probabilities_exactly_on_kinks(backend, soft, right):
    """p exactly on each edge / centre and one float32 step either side, several M (int(p*M) under- and
    over-estimates the bin of an edge value for some of them): values and gradients of the contract's side."""
    be = kb.get(backend)
    for M in (1, 2, 7, 13, 20):
        k = _edges(M, soft)
        p = torch.cat([k, torch.nextafter(k, k + 1), torch.nextafter(k, k - 1), torch.tensor([0.0, 1.0, 0.5])])
        p = p.clamp(0, 1)
        x = torch.stack([p, 1 - p, p.flip(0)]).unsqueeze(0).contiguous()  # [1, 3, n]
        N = x.shape[-1]
        t = (torch.arange(N) % 3).unsqueeze(0)
        grads = _grads(1, 3, M, seed=M)
        e = _edges(M, soft)
        ref = binned_stats_prepared(x, t, e, M, soft, 0, True, None, right)
        got = [v.cpu() for v in be.forward(x, t, e, M, soft, 0, True, None, right)]
        what = f"{backend} M={M} soft={soft} right={right}"
        if not soft:
            assert torch.equal(got[0], ref[0]), what
        _check_stats(got, ref, N, M, soft, what=what)
        g = be.backward(*grads, x, t, e, M, soft, 0, True, None, right).cpu()
        g_ref = kb.reference_backward(*grads, x, t, e, M, soft, 0, True, None, right)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6 * float(g_ref.abs().max()) + 1e-30, msg=what)


def _kinks(M, soft):
    return (bin_centres(M) if soft else bin_edges(M)[1:-1]).double()


def _logits_near_kinks(act, M, soft, seed=0):
    """Logits [1, C, N] whose float32 reference probabilities (class 0) sit on / within 2 ulp of each kink, plus
    random voxels. Sigmoid: C = 1, x = logit(v); softmax: C = 3, x = (a, 0, b) with softmax(x)[0] = v."""
    g = torch.Generator().manual_seed(seed)
    v = _kinks(M, soft)
    v = v[(v > 0) & (v < 1)]
    if act == 2:
        base = torch.log(v / (1 - v))
        cols = [base.float()]
    else:
        b = torch.randn(v.numel(), generator=g, dtype=torch.float64)
        a = torch.log(v * (1 + b.exp()) / (1 - v))
        cols = [torch.stack([a, torch.zeros_like(a), b]).float()]
    x0 = cols[0] if act == 2 else cols[0]
    xs = [x0]
    for steps in (1, 2, -1, -2):  # neighbouring float32 logits of class 0
        xn = x0.clone()
        row = xn if act == 2 else xn[0]
        for _ in range(abs(steps)):
            row.copy_(torch.nextafter(row, torch.full_like(row, float("inf") if steps > 0 else -float("inf"))))
        xs.append(xn)
    x = torch.cat(xs, dim=-1)
    C = 1 if act == 2 else 3
    x = x.view(C, -1) if act == 2 else x
    rnd = torch.randn(C, 40, generator=g) * 3
    return torch.cat([x, rnd], dim=-1).unsqueeze(0).contiguous()


def _near_kink_mask(p_ref, delta, M, soft):
    """[B, C, N] entries within δ of a kink and the kink value each is nearest to."""
    k = _kinks(M, soft)
    d = (p_ref.unsqueeze(-1) - k).abs()
    dist, idx = d.min(-1)
    return dist <= delta, k[idx]


def _gp_reference(p, y, grads, M, soft, right):
    """Reference d(loss)/dp of each entry at probabilities p (activation none), dense target y."""
    e = _edges(M, soft)
    return kb.reference_backward(*grads, p.float(), y.float(), e, M, soft, 0, False, None, right).double()


@pytest.mark.parametrize("act,soft", list(itertools.product([1, 2], [False, True])))
@pytest.mark.parametrize("backend", KERNELS)
def test_kinks_from_logits_bounded_by_near_kink_entries(backend, act, soft):
    be = kb.get(backend)
    M, right = 7, False
    x = _logits_near_kinks(act, M, soft, seed=act * 2 + soft)
    B, C, N = x.shape
    t = torch.randint(0, C, (B, N), generator=torch.Generator().manual_seed(1))
    y = (t.unsqueeze(1) == torch.arange(C).view(1, C, 1)).double()
    grads = _grads(B, C, M)
    e = _edges(M, soft)
    p_ref = (torch.softmax(x, 1) if act == 1 else torch.sigmoid(x)).double()  # the reference's float32 p
    delta = (C + 8 if act == 1 else 9) * EPS32 * p_ref + TINY
    near, kink = _near_kink_mask(p_ref, delta, M, soft)
    n_near = int(near.sum())
    assert n_near >= M - 1, f"the construction should put entries next to every kink, got {n_near}"

    # statistics bounds
    ref = binned_stats_prepared(x, t, e, M, soft, act, True, None, right)
    got = [v.cpu() for v in be.forward(x, t, e, M, soft, act, True, None, right)]
    assert got[3].tolist() == [0, 0]
    if soft:
        d = float((e[1:] - e[:-1]).min()) if M > 1 else 1.0
        s = delta.sum(-1, keepdim=True)
        extra = torch.stack([s / d, s / d + s, s / d]).expand(3, B, C, M)
    else:
        edges = bin_edges(M).double()
        # near-kink entries next to bin j: nearest edge e[j] or e[j + 1]
        j_of = torch.searchsorted(edges, kink.contiguous())  # index k of the edge e[k]
        adj = torch.zeros(B, C, M, dtype=torch.float64)
        for j in range(M):
            adj[..., j] = (near & ((j_of == j) | (j_of == j + 1))).sum(-1)
        s = (delta * near).sum(-1, keepdim=True)
        extra = torch.stack([adj, adj + s, adj])
    _check_stats(got, ref, N, M, soft, extra=extra, what=f"{backend} act={act} soft={soft}")
    if not soft:  # the count itself moves only with near-kink entries
        assert float((got[0].double() - ref[0].double()).abs().sum()) <= 2 * n_near

    # gradient bounds: J = jump of the reference g_p across the nearest kink, at kink -+ 2 delta
    lo = (kink - 2 * delta).clamp(0, 1)
    hi = (kink + 2 * delta).clamp(0, 1)
    jump = (_gp_reference(hi, y, grads, M, soft, right) - _gp_reference(lo, y, grads, M, soft, right)).abs()
    jump = torch.where(near, jump, torch.zeros_like(jump))
    per_voxel = jump.sum(1, keepdim=True) if act == 1 else jump / 4
    g = be.backward(*grads, x, t, e, M, soft, act, True, None, right).cpu().double()
    g_ref = kb.reference_backward(*grads, x, t, e, M, soft, act, True, None, right).double()
    base = 1e-4 * g_ref.abs() + 1e-5 * float(g_ref.abs().max()) + 1e-30
    err = (g - g_ref).abs()
    assert bool((err <= base + per_voxel).all()), (
        f"{backend} act={act} soft={soft}: gradient off by {float((err / (base + per_voxel)).max()):.3g}x the "
        f"kink bound ({n_near} near-kink entries)"
    )
    far = per_voxel.expand_as(err) == 0
    assert bool((err[far] <= base[far]).all()), "an entry away from every kink must get the reference gradient"
