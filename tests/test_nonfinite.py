"""The contract's non-finite rule (docs/kernel_contract.md, "Entries, probabilities, targets") on every backend.

Rule: a marginal entry whose probability p (after the activation) is NaN or +-inf is left out of every statistic,
gets gradient exactly 0 and is counted in ``bad[1]``; a top-label entry is left out when any p of its voxel is
non-finite (``bad[1]`` still counts the p, so it does not depend on the mode); entries of ignored voxels and of
voxels with an out-of-range label are skipped first and not counted. Softmax: a NaN or +inf logit makes every p
of the voxel NaN; -inf gives p = 0 unless every logit of the voxel is -inf. Sigmoid(+-inf) is finite.

Oracle: the statistics and gradient of the same problem with the left-out entries removed, computed by the
reference on inputs holding no non-finite value at all (one subproblem per (image, class) for marginal activation
none / sigmoid, whose entries are independent; one per image without the left-out voxels for softmax and for
top-label), so the oracle never runs the rule it checks. ``bad`` is counted from the logits by the rule above,
independently of any backend. The comparison uses the one error budget (tests/_conformance.py); the rule itself
makes left-out gradients structurally zero there (exactly 0 required).

The conformance grid (tests/test_conformance.py) also sprinkles non-finite entries into every option combination
(every dtype, raters, moments) and checks them against the reference and the NumPy oracle.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import calibops.functional as F

from . import _conformance as cf
from . import _kernel_backends as kb

NAN, INF = float("nan"), float("inf")
BACKENDS = list(kb.ALL_BACKENDS)


def _finite_entries(x: torch.Tensor, act: int) -> torch.Tensor:
    """[B, C, N] bool: p of the entry is finite, from the logits by the rule (no activation computed)."""
    x = x.float()
    if act == 0:
        return torch.isfinite(x)
    if act == 2:
        return ~torch.isnan(x)
    bad = torch.isnan(x).any(1) | (x == INF).any(1) | (x == -INF).all(1)
    return (~bad).unsqueeze(1).expand_as(x)


def expected(case: cf.Case, grads: tuple[torch.Tensor, ...]):
    """(outputs, grad) of ``case`` with the left-out entries removed, from clean reference subproblems."""
    B, C, N, R, K = case.shape
    assert R == 1 and case.moments
    x, t, act, mode = case.input, case.target, case.activation, case.mode
    labels = case.target_kind == 0
    M = case.num_bins
    fin = _finite_entries(x, act)
    if labels:
        lab = t[:, 0].long()
        used = (lab >= 0) & (lab < C) & (lab != case.ignore_index)
        bad0 = int(((lab < 0) | (lab >= C)).logical_and(lab != case.ignore_index).sum())
    else:
        used = torch.ones(B, N, dtype=torch.bool)
        bad0 = 0
    good = fin & used.unsqueeze(1)
    bad = torch.tensor([bad0, int((~fin & used.unsqueeze(1)).sum())])
    ref = kb.backends()[0]
    outs = [
        torch.zeros(B, K, M),
        torch.zeros(B, K, M),
        torch.zeros(B, K, 1, M),
        torch.zeros(B, K, M),
        torch.zeros(B, K, M),
    ]
    grad = torch.zeros_like(x)
    opts = (case.edges, M, case.scheme, act)
    y = (lab.unsqueeze(1) == torch.arange(C).view(1, C, 1)).float() if labels else t.float()
    for b in range(B):
        if act == 1 or mode == 1:  # whole voxels
            keep = good[b].all(0)
            xs = x[b][:, keep].unsqueeze(0)
            ts = t[b][:, keep].unsqueeze(0)
            gs = [g[b : b + 1] for g in grads]
            sub = (xs, ts, *opts, case.target_kind, mode, True, None, case.right)
            out = ref.forward(*sub)
            assert not bool(torch.isnan(xs.float()).any()) and int(out[5].sum()) == 0
            for o, v in zip(outs, out[:5]):
                o[b] = v[0]
            grad[b][:, keep] = kb.reference_backward(*gs, *sub)[0]
            continue
        for c in range(C):
            keep = good[b, c]
            xs = x[b, c][keep].view(1, 1, -1)
            ys = y[b, c][keep].view(1, 1, -1)
            gs = [g[b : b + 1, c : c + 1] for g in grads]
            sub = (xs, ys, *opts, 1, 0, True, None, case.right)
            out = ref.forward(*sub)
            assert int(out[5].sum()) == 0
            for o, v in zip(outs, out[:5]):
                o[b, c] = v[0, 0]
            grad[b, c][keep] = kb.reference_backward(*gs, *sub)[0, 0]
    return (*outs, bad), grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_repro_every_backend(backend):
    """A NaN probability next to 0.3, dense target, 5 bins, hard and soft, both modes: exactly the statistics of
    the input [0.3] alone, bad = [0, 1], gradient 0 at the NaN."""
    be = kb.get(backend)
    x = torch.tensor([[[NAN, 0.3]]])
    t = torch.tensor([[[1.0, 0.0]]])
    for scheme, mode in itertools.product((0, 1), (0, 1)):
        e = cf.edges_for(5, scheme)
        got = be.forward(x, t, e, 5, scheme, 0, 1, mode, True, None, False)
        clean = kb.backends()[0].forward(x[..., 1:], t[..., 1:], e, 5, scheme, 0, 1, mode, True, None, False)
        for a, b in zip(got[:5], clean[:5]):
            assert torch.equal(a.cpu(), b), (backend, scheme, mode, a, b)
        assert got[5].tolist() == [0, 1]
        g = be.backward(
            *(torch.ones(1, 1, 5),) * 2,
            torch.ones(1, 1, 1, 5),
            *(torch.ones(1, 1, 5),) * 2,
            x,
            t,
            e,
            5,
            scheme,
            0,
            1,
            mode,
            True,
            None,
            False,
        )
        assert g[0, 0, 0].item() == 0.0 and g.isfinite().all()


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu", "triton") if b in kb.backend_names()])
def test_issue_repro_public_api(backend):
    """calibops.functional.binned_stats(..., validate=False): the NaN entry is left out on every backend."""
    x = torch.tensor([[[NAN, 0.3]]])
    t = torch.tensor([[[1.0, 0.0]]])
    for binning in ("hard", "soft"):
        got = F.binned_stats(x, t, num_bins=5, binning=binning, validate=False, backend=backend)
        clean = F.binned_stats(x[..., 1:], t[..., 1:], num_bins=5, binning=binning, backend="reference")
        for a, b in zip(got, clean):
            assert torch.equal(a, b), (backend, binning, a, b)


CASES = list(itertools.product([0, 1, 2], [0, 1], [0, 1], [0, 1]))


@pytest.mark.parametrize("act,scheme,tk,mode", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_matches_problem_without_bad_entries(backend, act, scheme, tk, mode):
    """NaN, +inf and -inf probabilities / logits, hard and soft, labels (ignored and out-of-range voxels holding
    non-finite entries) and dense targets, marginal and top-label, moments on; right=True for sigmoid."""
    be = kb.get(backend)
    N = 37 if be.slow else 151
    case = cf.nonfinite_case(
        B=2,
        C=3,
        N=N,
        M=7,
        scheme=scheme,
        activation=act,
        target_kind=tk,
        mode=mode,
        right=act == 2,
        seed=act * 8 + scheme * 4 + tk * 2 + mode,
    )
    grads = cf.make_grads(case, seed=5)
    exp, exp_grad = expected(case, grads)
    assert int(exp[5][1]) > 0  # the case does exercise the rule
    args = case.args()
    got = tuple(v.cpu() for v in be.forward(*args))
    g = be.backward(*grads, *args).cpu()
    budget = cf.error_budget(case, exp, grads, exp_grad)
    cf.check(case, got, exp, budget, f"{backend} {case.describe()}", g, exp_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_per_activation_by_hand(backend):
    """One voxel per case, labels all class 0, C = 2: which entries are counted, by hand, in both modes."""
    be = kb.get(backend)
    x = torch.tensor(
        [[[NAN, INF, -INF, 0.5, -INF, 1.0], [0.2, 0.3, 0.4, NAN, -INF, INF]]]
    )  # voxels: (nan, .2) (inf, .3) (-inf, .4) (.5, nan) (-inf, -inf) (1, inf)
    t = torch.zeros(1, 1, 6, dtype=torch.int64)
    e = cf.edges_for(4, 0)
    # activation 0: every NaN / +-inf entry: 4 + 3; sigmoid: only NaN: 2;
    # softmax: voxels with a NaN or +inf logit, or all -inf: voxels 0, 1, 3, 4, 5 -> 5 voxels x 2 classes = 10
    # top-label keeps the voxels whose every p is finite: none (act 0), 4 (sigmoid), 1 (softmax)
    for act, n, top in ((0, 7, 0), (2, 2, 4), (1, 10, 1)):
        for mode in (0, 1):
            got = be.forward(x, t, e, 4, 0, act, 0, mode, False, None, False)
            assert got[5].tolist() == [0, n], (backend, act, mode, got[5].tolist())
            assert float(got[0].sum()) == (12 - n if mode == 0 else top), (backend, act, mode)
