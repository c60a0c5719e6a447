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
