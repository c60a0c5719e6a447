"""The kink rule of docs/kernel_contract.md ("Kinks: where backends may legitimately take different sides").

Probabilities given directly (activation 0) exactly on every edge / centre are tested on every backend by
tests/test_conformance.py::test_exact_kinks (no allowance: the contract's side, bitwise hard counts). Here:

1. From logits whose reference probabilities sit on or within a few ulps of the inner hard edges and the soft
   centres, every backend (marginal and top-label, sigmoid and softmax) stays within the error budget of
   tests/_conformance.py, whose kink allowance applies only to the entries within δ of a kink; every other entry
   must match within rounding. The construction must actually produce such entries, and hard counts may move by
   at most one per such entry and adjacent bin.
2. The budget's kink allowance itself: none for probabilities, and for a logit within δ of an edge exactly the two
   adjacent bins of its row.
3. Soft ``right`` at an exact centre (the contract's "Binning schemes"): every backend takes the slope of the
   interval below (``right=False``) or the one-sided slope of the interval above (``right=True``) of each centre,
   the constant branch at the first (last) centre, with the same statistics either way; checked against slopes
   written out by hand, against one-sided finite differences in float64, and against a bucketize formulation with
   MONAI's semantics (``SoftL1ACELoss``: ``bucketize(q, centres, right=right)``, the two neighbouring centres,
   autograd through the interpolation weight).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from . import _conformance as cf
from . import _kernel_backends as kb

BACKENDS = list(kb.ALL_BACKENDS)


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("act,scheme", list(itertools.product([1, 2], [0, 1])))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kinks_from_logits(backend, act, scheme, mode):
    be = kb.get(backend)
    M = 7
    case = cf.near_kink_logits_case(act, M, scheme, mode, seed=act * 4 + scheme * 2 + mode)
    grads = cf.make_grads(case, seed=3)
    budget = cf.conform(be, case, grads)
    n_kinks = (M - 1 if scheme == 0 else M) if not (act == 1 and mode == 1) else 1
    assert budget.uncertain >= n_kinks, f"the construction should put entries next to the kinks: {budget.uncertain}"
    if scheme == 0:
        got = be.forward(*case.args())[0].cpu().double()
        ref = kb.backends()[0].forward(*case.args())[0].double()
        assert float((got - ref).abs().sum()) <= 2 * budget.uncertain


def test_budget_has_no_kink_allowance_for_probabilities():
    for scheme, right, mode in itertools.product((0, 1), (False, True), (0, 1)):
        case = cf.with_(cf.exact_kink_case(13, scheme, right, mode=mode), moments=True)
        ref = kb.backends()[0].forward(*case.args())
        budget = cf.error_budget(case, ref)
        assert budget.uncertain == 0
        if scheme == 0:
            assert float(budget.stats[0].abs().sum()) == 0.0  # hard counts: bitwise
            assert float(budget.stats[2].abs().sum()) == 0.0  # hard sum_y of labels: bitwise


def test_budget_allowance_is_the_two_adjacent_bins():
    """A sigmoid logit whose p is within δ of edge e[3] of M = 7: count may move by 1 in bins 2 and 3 of its row,
    nothing elsewhere; a logit far from every edge gets no allowance (hard counts bitwise)."""
    e = cf.edges_for(7, 0).double()
    v = e[3]
    x = torch.tensor([[[float(torch.log(v / (1 - v))), 0.1]]])  # p ~ e[3], p = sigmoid(0.1) ~ 0.525 (bin 3)
    case = cf.Case(x, torch.zeros(1, 1, 2, dtype=torch.long), 7, 0, 2, 0, 0, False, None, False, "one near edge")
    ref = kb.backends()[0].forward(*case.args())
    budget = cf.error_budget(case, ref)
    assert budget.uncertain == 1
    assert budget.stats[0][0, 0].tolist() == [0, 0, 1, 1, 0, 0, 0]
    far = cf.with_(case, input=x[..., 1:], target=case.target[..., 1:])
    assert float(cf.error_budget(far, kb.backends()[0].forward(*far.args())).stats[0].sum()) == 0.0


# ---------------------------------------------------------------------------------------------------------
# 3. Soft `right` at an exact centre
# ---------------------------------------------------------------------------------------------------------
def _centre_case(M: int, right: bool, dtype: torch.dtype = torch.float32) -> cf.Case:
    """One voxel per centre of M (probabilities, C = 1, dense target 1), soft scheme."""
    c = cf.edges_for(M, 1)
    x = c.view(1, 1, M).to(dtype).contiguous()
    return cf.Case(x, torch.ones(1, 1, M), M, 1, 0, 1, 0, True, None, right, f"centres M={M} right={right}")


def _count_only_grads(case: cf.Case, gc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    z = torch.zeros(1, 1, case.num_bins)
    return gc.view(1, 1, -1), z, z.view(1, 1, 1, -1), z, z


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_right_slope_at_exact_centres(backend, right):
    """q = c[k] for every k (M = 7 and 20): with only a count gradient Gc, g_q = (Gc[k] - Gc[k-1]) / d below
    (right=False; 0 at k = 0) or (Gc[k+1] - Gc[k]) / d above (right=True; 0 at k = M - 1). The statistics are the
    same for both rules (all weight in bin k)."""
    be = kb.get(backend)
    for M in (7, 20):
        case = _centre_case(M, right)
        c = cf.edges_for(M, 1).double()
        gc = torch.randn(M, generator=torch.Generator().manual_seed(M), dtype=torch.float64).float()
        g = gc.double()
        want = torch.zeros(M, dtype=torch.float64)
        for k in range(M):
            if right and k < M - 1:
                want[k] = (g[k + 1] - g[k]) / (c[k + 1] - c[k])
            elif not right and k > 0:
                want[k] = (g[k] - g[k - 1]) / (c[k] - c[k - 1])
        got = be.backward(*_count_only_grads(case, gc), *case.args()).double().view(-1)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (backend, M, right, got, want)
        # the sides really differ (a test that cannot tell the rules apart proves nothing)
        other = be.backward(*_count_only_grads(case, gc), *cf.with_(case, right=not right).args()).double().view(-1)
        assert float((other - got).abs().max()) > 1.0
        # statistics: all weight in bin k, whichever rule (within float32 rounding of the weights)
        out = be.forward(*case.args())
        assert torch.allclose(out[0].view(-1).double(), torch.ones(M, dtype=torch.float64), atol=4e-7), out[0]
        assert torch.allclose(out[1].view(-1).double(), c, atol=4e-7)
        assert torch.allclose(out[3].view(-1).double(), c * c, atol=4e-7)
        flipped = be.forward(*cf.with_(case, right=not right).args())
        for a, b in zip(out[:5], flipped[:5]):
            assert torch.allclose(a, b, atol=4e-7), (backend, M)
        # and the whole budgeted comparison (every output's gradient at once)
        cf.conform(be, case, cf.make_grads(case, seed=M))


def test_soft_right_is_the_one_sided_derivative():
    """float64 reference: the right=True gradient at a centre is the limit of finite differences from above, the
    right=False gradient the one from below (the statistics are piecewise linear/quadratic in q, so a step of
    1e-9 is exact to ~1e-6)."""
    ref = kb.backends()[0]
    M, h = 7, 1e-9
    case = _centre_case(M, False, torch.float64)
    grads = cf.make_grads(case, seed=5)

    def loss(x: torch.Tensor) -> float:
        out = ref.forward(*cf.with_(case, input=x).args())
        return float(sum((o * g.double()).sum() for o, g in zip(out[:5], grads)))

    x0 = case.input
    for right, step in ((False, -h), (True, h)):
        g = ref.backward(*grads, *cf.with_(case, right=right).args()).view(-1)
        for k in range(M):
            xk = x0.clone()
            xk[0, 0, k] += step
            fd = (loss(xk) - loss(x0)) / step
            assert abs(fd - float(g[k])) <= 1e-5 * max(1.0, abs(fd)), (right, k, fd, float(g[k]))


def _bucketize_soft_stats(q: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, right: bool):
    """Soft-binned (count, sum_p, sum_y) [B, C, M] with MONAI's semantics, written independently: the insertion
    index of q among the centres (``right`` as torch.bucketize), the centres on either side of it (clamped to the
    ends), the upper neighbour's weight (q - c_left) / (c_right - c_left) where they differ, else 0."""
    M = centres.numel()
    pos = torch.bucketize(q.detach(), centres, right=right)
    left, upper = (pos - 1).clamp(0, M - 1), pos.clamp(max=M - 1)
    c_l, c_u = centres[left], centres[upper]
    split = left != upper
    w_u = torch.where(split, (q - c_l) / torch.where(split, c_u - c_l, torch.ones_like(c_u)), torch.zeros_like(q))
    w_l = 1 - w_u
    out = []
    for v in (torch.ones_like(q), q, y):
        z = torch.zeros(*q.shape[:2], M, dtype=q.dtype)
        out.append(z.scatter_add(2, left, w_l * v).scatter_add(2, upper, w_u * v))
    return out


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_right_matches_monai_semantics(backend, right):
    """Random probabilities with ~half the entries exactly on centres (and on 0, 1): every backend's statistics and
    (count, sum_p, sum_y) gradients equal the bucketize formulation's, computed in float64 by autograd."""
    be = kb.get(backend)
    M, N = 9, 40 if be.slow else 300
    gen = torch.Generator().manual_seed(31 + right)
    centres = cf.edges_for(M, 1)
    x = torch.rand(2, 3, N, generator=gen)
    on = torch.rand(2, 3, N, generator=gen) < 0.5
    pick = torch.cat([centres, torch.tensor([0.0, 1.0])])
    x = torch.where(on, pick[torch.randint(0, M + 2, (2, 3, N), generator=gen)], x).contiguous()
    y = (torch.rand(2, 3, N, generator=gen) < 0.4).float()
    case = cf.Case(x, y, M, 1, 0, 1, 0, False, None, right, "monai soft right")
    gc, gp, gy = (torch.randn(2, 3, M, generator=gen) for _ in range(3))
    xd = x.double().requires_grad_(True)
    cnt, sp, sy = _bucketize_soft_stats(xd, y.double(), centres.double(), right)
    ((cnt * gc.double()).sum() + (sp * gp.double()).sum() + (sy * gy.double()).sum()).backward()
    out = be.forward(*case.args())
    for got, want in zip(out[:3], (cnt, sp, sy.unsqueeze(2))):
        assert torch.allclose(got.double(), want.detach(), atol=2e-5), backend
    z = torch.zeros(0)
    grad = be.backward(gc, gp, gy.unsqueeze(2), z, z, *case.args())
    assert torch.allclose(grad.double(), xd.grad, rtol=1e-5, atol=1e-3), (
        backend,
        (grad.double() - xd.grad).abs().max(),
    )
