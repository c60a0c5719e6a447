"""The contract's non-finite rule (docs/kernel_contract.md, "Non-finite probabilities") on every backend.

Rule: an entry whose probability p (after the activation) is NaN or +-inf is left out of every statistic, gets
gradient exactly 0 and is counted in ``bad[1]``; entries of ignored voxels and of voxels with an out-of-range
label are skipped first and not counted. Softmax: a NaN or +inf logit makes every p of the voxel NaN; -inf gives
p = 0 unless every logit of the voxel is -inf. Sigmoid(+-inf) is finite.

Oracle: the statistics and gradient of the same problem with the bad entries removed, computed by the reference
on inputs that hold no non-finite value at all (one subproblem per (image, class) for activation none / sigmoid,
whose entries are independent; one per image with the bad voxels removed for softmax), so the oracle never runs
the rule it checks. ``bad[1]`` is counted from the logits by the rule above, independently of any backend.

Backends: every one available here (tests/_kernel_backends.py): reference, cpu, triton (interpreted on CPU),
the CUDA kernels' host emulation (and cuda on a GPU).

Tolerances (derived as in tests/test_cuda_backend.py and tests/test_cpu_backend.py): the finite logits are drawn
at least ``KINK_MARGIN`` = 1e-5 (float64 p) from every inner hard edge and soft centre, far beyond the few ulps
by which backends' activations differ (the kink rule in docs/kernel_contract.md), so hard counts must be equal
exactly; other statistics within ``STAT_RTOL`` = 2e-5 of ``|stat| + count`` (float32 runs of <= 256 terms on
the GPU kernels) plus, for soft binning, ``8·eps32·(N + M·sqrt(N))`` (float32 memberships and activation ulps
moving them); gradients within ``GRAD_RTOL[dtype]`` elementwise plus 1e-5 of the largest. Left-out entries:
gradient exactly 0, ``bad`` exactly equal.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import calibops.functional as F
from calibops.reference import bin_centres, bin_edges, binned_stats_prepared

from . import _kernel_backends as kb

EPS32 = float(torch.finfo(torch.float32).eps)
STAT_RTOL = 2e-5
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
KINK_MARGIN = 1e-5
NAN, INF = float("nan"), float("inf")
BACKENDS = kb.backend_names()


def _edges(M: int, soft: bool) -> torch.Tensor:
    return bin_centres(M) if soft else bin_edges(M)


def _p64(x: torch.Tensor, act: int) -> torch.Tensor:
    x = x.double()
    return torch.softmax(x, 1) if act == 1 else torch.sigmoid(x) if act == 2 else x


def _near_kink(p64: torch.Tensor, M: int) -> torch.Tensor:
    """[B, N]: some class of the voxel has p within KINK_MARGIN of an inner edge or a centre."""
    kinks = torch.cat([bin_edges(M)[1:-1], bin_centres(M)]).double()
    return ((p64.unsqueeze(-1) - kinks).abs() < KINK_MARGIN).any(-1).any(1)


def make_problem(B, C, N, *, act, labels, M=7, dtype=torch.float32, seed=0):
    """Random input [B, C, N] (probabilities for act 0, logits otherwise) away from every kink, with NaN, +inf and
    -inf entries, and labels (some ignored = -1, some out of range = C) or a dense target. The first voxels are
    fixed cases: a non-finite entry in an ignored voxel, one in an out-of-range voxel, and for softmax a voxel
    with one -inf logit (finite p) and a voxel of all -inf logits (non-finite)."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape):
        z = torch.randn(*shape, generator=g) * 3
        if act == 0:
            z = torch.softmax(z, 1) if shape[1] > 1 else torch.rand(*shape, generator=g)
        return z

    x = draw((B, C, N))
    for _ in range(100):
        near = _near_kink(_p64(x, act), M)
        if not near.any():
            break
        x = torch.where(near.unsqueeze(1), draw((B, C, N)), x)
    else:
        raise AssertionError("could not draw inputs away from the kinks")
    vals = torch.tensor([NAN, INF, -INF])
    pick = torch.rand(B, C, N, generator=g) < 0.08
    x = torch.where(pick, vals[torch.randint(0, 3, (B, C, N), generator=g)], x)
    x[:, 0, 0] = NAN  # voxel 0: ignored (labels) or counted (dense)
    x[:, 0, 1] = INF  # voxel 1: out-of-range label (labels) or counted (dense)
    if act == 1 and C > 1 and N > 3:
        x[:, :, 2] = torch.randn(B, C, generator=g)
        x[:, 0, 2] = -INF  # finite voxel: p = 0 for class 0
        x[:, :, 3] = -INF  # every logit -inf: every p NaN
    x = x.to(dtype)
    if labels:
        t = torch.randint(0, C, (B, N), generator=g)
        t[torch.rand(B, N, generator=g) < 0.1] = -1
        t[torch.rand(B, N, generator=g) < 0.05] = C
        t[:, 0], t[:, 1] = -1, C
        if N > 3:
            t[:, 2:4] = 0
    else:
        t = torch.rand(B, C, N, generator=g)
    return x, t


def _finite_entries(x: torch.Tensor, act: int) -> torch.Tensor:
    """[B, C, N] bool: p of the entry is finite, from the logits by the rule (no activation computed)."""
    x = x.float()
    if act == 0:
        return torch.isfinite(x)
    if act == 2:
        return ~torch.isnan(x)
    bad = torch.isnan(x).any(1) | (x == INF).any(1) | (x == -INF).all(1)
    return (~bad).unsqueeze(1).expand_as(x)


def _used_voxels(t, labels, B, N, C, ignore_index=-1):
    if not labels:
        return torch.ones(B, N, dtype=torch.bool)
    return (t >= 0) & (t < C) & (t != ignore_index)


def expected(x, t, grads, M, soft, act, labels, right=False, ignore_index=-1):
    """(count, sum_p, sum_y, bad, grad, left_out) of the problem with the non-finite entries removed."""
    B, C, N = x.shape
    fin = _finite_entries(x, act)
    used = _used_voxels(t, labels, B, N, C, ignore_index).unsqueeze(1).expand(B, C, N)
    good = fin & used
    bad = torch.tensor(
        [int(((t < 0) | (t >= C)).logical_and(t != ignore_index).sum()) if labels else 0, int((~fin & used).sum())]
    )
    e = _edges(M, soft)
    stats = [torch.zeros(B, C, M) for _ in range(3)]
    grad = torch.zeros_like(x)
    gc, gp, gy = grads
    y = (t.unsqueeze(1) == torch.arange(C).view(1, C, 1)).float() if labels else t
    for b in range(B):
        if act == 1:  # whole voxels
            keep = good[b, 0]
            xs = x[b][:, keep].unsqueeze(0)
            ts = t[b][keep].unsqueeze(0) if labels else t[b][:, keep].unsqueeze(0)
            gs = [g[b : b + 1] for g in (gc, gp, gy)]
            out = binned_stats_prepared(xs, ts, e, M, soft, act, labels, None, right)
            assert not bool(torch.isnan(xs.float()).any()) and int(out[3].sum()) == 0
            for s, o in zip(stats, out[:3]):
                s[b] = o[0]
            grad[b][:, keep] = kb.reference_backward(*gs, xs, ts, e, M, soft, act, labels, None, right)[0]
            continue
        for c in range(C):
            keep = good[b, c]
            xs = x[b, c][keep].view(1, 1, -1)
            ys = y[b, c][keep].view(1, 1, -1)
            gs = [g[b : b + 1, c : c + 1] for g in (gc, gp, gy)]
            out = binned_stats_prepared(xs, ys, e, M, soft, act, False, None, right)
            assert int(out[3].sum()) == 0
            for s, o in zip(stats, out[:3]):
                s[b, c] = o[0, 0]
            grad[b, c][keep] = kb.reference_backward(*gs, xs, ys, e, M, soft, act, False, None, right)[0, 0]
    return (*stats, bad, grad, ~good)


def check_against_expected(name, got, got_grad, exp, soft, dtype, what):
    cnt, sp, sy, bad = got
    ec, esp, esy, ebad, egrad, left_out = exp
    N = left_out.shape[-1]
    assert bad.dtype == torch.int64 and bad.shape == (2,), f"{what}: bad {bad.dtype} {tuple(bad.shape)}"
    assert bad.tolist() == ebad.tolist(), f"{what}: bad {bad.tolist()} != {ebad.tolist()}"
    if not soft:
        assert torch.equal(cnt, ec), f"{what}: hard counts differ by {float((cnt - ec).abs().max())}"
    atol = 8 * EPS32 * (N + cnt.shape[-1] * N**0.5) if soft else 0.0
    for nm, a, b in (("count", cnt, ec), ("sum_p", sp, esp), ("sum_y", sy, esy)):
        assert bool(torch.isfinite(a).all()), f"{what}: {nm} not finite"
        tol = STAT_RTOL * (b.abs() + ec.abs()) + atol + 1e-6
        err = (a.double() - b.double()).abs()
        assert bool((err <= tol).all()), f"{what}: {nm} off by {float((err / tol).max()):.3g}x its tolerance"
    assert got_grad.dtype == dtype and got_grad.shape == egrad.shape
    zero = got_grad[left_out]
    assert bool((zero == 0).all()), f"{what}: left-out entries got gradient {zero[zero != 0][:5].tolist()}"
    scale = float(egrad.float().abs().max()) if egrad.numel() else 0.0
    torch.testing.assert_close(
        got_grad.float(),
        egrad.float(),
        rtol=GRAD_RTOL[dtype],
        atol=1e-5 * scale + 1e-30,
        msg=lambda m: f"{what}: {m}",
    )


def _grads(B, C, M, seed=5):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, C, M, generator=g) * s for s in (0.5, 1.0, 0.7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_repro_every_backend(backend):
    """The issue's repro at the op level: a NaN probability next to 0.3, dense target, 5 bins, hard and soft:
    exactly the statistics of the input [0.3] alone, bad = [0, 1]."""
    be = kb.get(backend)
    x = torch.tensor([[[NAN, 0.3]]])
    t = torch.tensor([[[1.0, 0.0]]])
    for soft in (False, True):
        e = _edges(5, soft)
        got = be.forward(x, t, e, 5, soft, 0, False, None, False)
        clean = binned_stats_prepared(x[..., 1:], t[..., 1:], e, 5, soft, 0, False, None, False)
        for a, b in zip(got[:3], clean[:3]):
            assert torch.equal(a.cpu(), b), (backend, soft, a, b)
        assert got[3].tolist() == [0, 1]
        g = be.backward(*(torch.ones(1, 1, 5),) * 3, x, t, e, 5, soft, 0, False, None, False)
        assert g[0, 0, 0].item() == 0.0 and g.isfinite().all()


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu", "triton") if b in BACKENDS])
def test_issue_repro_public_api(backend):
    """calibops.functional.binned_stats(..., validate=False): the NaN entry is left out on every backend (it went
    to the last hard bin on the reference and to bin 0 on cpu / triton before the rule)."""
    x = torch.tensor([[[NAN, 0.3]]])
    t = torch.tensor([[[1.0, 0.0]]])
    for binning in ("hard", "soft"):
        got = F.binned_stats(x, t, num_bins=5, binning=binning, validate=False, backend=backend)
        clean = F.binned_stats(x[..., 1:], t[..., 1:], num_bins=5, binning=binning, backend="reference")
        for a, b in zip(got, clean):
            assert torch.equal(a, b), (backend, binning, a, b)


CASES = list(itertools.product([0, 1, 2], [False, True], [True, False]))


@pytest.mark.parametrize("act,soft,labels", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_matches_problem_without_bad_entries(backend, act, soft, labels):
    """NaN, +inf and -inf probabilities / logits (softmax, sigmoid), hard and soft, labels (with ignored and
    out-of-range voxels holding non-finite entries) and dense targets, right=True for sigmoid."""
    be = kb.get(backend)
    B, C, N, M = 2, 3, (37 if be.slow else 301), 7
    x, t = make_problem(B, C, N, act=act, labels=labels, M=M, seed=act * 4 + soft * 2 + labels)
    right = act == 2
    ii = -1 if labels else None
    grads = _grads(B, C, M)
    exp = expected(x, t, grads, M, soft, act, labels, right=right)
    e = _edges(M, soft)
    got = [v.cpu() for v in be.forward(x, t, e, M, soft, act, labels, ii, right)]
    g = be.backward(*grads, x, t, e, M, soft, act, labels, ii, right).cpu()
    check_against_expected(backend, got, g, exp, soft, x.dtype, f"{backend} act={act} soft={soft} labels={labels}")
    assert int(exp[3][1]) > 0  # the case does exercise the rule


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_half_inputs(backend, dtype):
    """NaN / inf are representable in float16 / bfloat16 and follow the same rule (softmax, hard; none, soft)."""
    be = kb.get(backend)
    B, C, N, M = 1, 4, (33 if be.slow else 257), 5
    for act, soft in ((1, False), (0, True)):
        x, t = make_problem(B, C, N, act=act, labels=True, M=M, dtype=dtype, seed=11 + act)
        grads = _grads(B, C, M, seed=2)
        exp = expected(x, t, grads, M, soft, act, True)
        e = _edges(M, soft)
        got = [v.cpu() for v in be.forward(x, t, e, M, soft, act, True, -1, False)]
        g = be.backward(*grads, x, t, e, M, soft, act, True, -1, False).cpu()
        check_against_expected(backend, got, g, exp, soft, dtype, f"{backend} {dtype} act={act} soft={soft}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_per_activation_by_hand(backend):
    """One voxel per case, labels all class 0, C = 2: which entries are counted, by hand."""
    be = kb.get(backend)
    x = torch.tensor(
        [[[NAN, INF, -INF, 0.5, -INF, 1.0], [0.2, 0.3, 0.4, NAN, -INF, INF]]]
    )  # voxels: (nan, .2) (inf, .3) (-inf, .4) (.5, nan) (-inf, -inf) (1, inf)
    t = torch.zeros(1, 6, dtype=torch.int64)
    e = bin_edges(4)
    # activation 0: every NaN / +-inf entry: 4 + 3; sigmoid: only NaN: 2;
    # softmax: voxels with a NaN or +inf logit, or all -inf: voxels 0, 1, 3, 4, 5 -> 5 voxels x 2 classes = 10
    for act, n in ((0, 7), (2, 2), (1, 10)):
        got = be.forward(x, t, e, 4, False, act, True, None, False)
        assert got[3].tolist() == [0, n], (backend, act, got[3].tolist())
        assert float(got[0].sum()) == 12 - n
