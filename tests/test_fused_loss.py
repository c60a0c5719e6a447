"""The eager loss path on a kernel backend (``calibops.engine._FusedLoss``: statistics op, row slicing, epilogue
and reduction as one autograd node) against the composed path that the reference backend and compiled graphs run
(the statistics Function, slicing views, the epilogue Function, the reduction): the same formulas, so the same
values and input gradients to the bit, for every option that changes what the node does."""

from __future__ import annotations

import itertools

import pytest
import torch

from calibops import engine
from calibops.backends import available_backends
from calibops.options import Options
from calibops.results import BinnedStats, ace_from_stats, reduce_loss

KERNELS = [b for b in ("cpu", "triton") if available_backends()[b] is None]
pytestmark = pytest.mark.skipif(not KERNELS, reason="no kernel backend on this machine")


def _composed(x, y, o, weight):
    r = engine.run(x, y, o, weight=weight)
    stats = r.stats
    if o.multi_rater:
        stats = BinnedStats(stats.count, stats.sum_p, stats.sum_y.mean(-2))
    per_class = ace_from_stats(
        stats,
        soft=o.binning == "soft",
        empty_weight=o.empty_weight,
        ignore_empty_classes=o.ignore_empty_classes,
        weight=r.weight,
    )
    return reduce_loss(per_class, o.reduction)


def _case(seed, B, C, R, size, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, *size, generator=g) * 3).to(dtype)
    labels = torch.randint(0, max(C, 2), (B, R, *size), generator=g)
    if C > 1:
        labels[0, :, 0] = C - 1  # class C-1 present, class 0 absent in image 0: ignore_empty_classes matters
        labels[0][labels[0] == 0] = 1
    return x, labels


def _both(backend, x, y, o, weight, grad_out):
    results = []
    for fused in (True, False):
        xi = x.detach().clone().requires_grad_(True)
        out = engine.loss(xi, y, o, weight) if fused else _composed(xi, y, o, weight)
        node = type(out.grad_fn).__name__
        if fused:  # the eager path on a kernel backend is the one node
            assert node == "_FusedLossBackward", node
        else:
            assert node != "_FusedLossBackward", node
        out.backward(grad_out if out.dim() else grad_out.sum())
        results.append((out.detach(), xi.grad))
    return results


CASES = list(
    itertools.product(
        ("hard", "soft"),
        (True, False),  # include_background
        (1, 3),  # raters (R > 1: the rater mean)
        ("mean", "sum", "none"),
    )
)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(("binning", "background", "raters", "reduction"), CASES)
def test_fused_equals_composed(backend, binning, background, raters, reduction):
    small = backend == "triton"  # interpreted: keep it tiny
    B, C, size = (2, 3, (5, 4)) if small else (3, 4, (6, 5, 4))
    x, labels = _case(CASES.index((binning, background, raters, reduction)), B, C, raters, size, torch.float32)
    o = Options(
        binning=binning,
        include_background=background,
        to_onehot_y=True,
        softmax=True,
        multi_rater=raters > 1,
        reduction=reduction,
        backend=backend,
        num_bins=7,
    )
    y = labels if raters > 1 else labels[:, :1]
    used = C if background else C - 1
    grad_out = torch.rand(B, used, generator=torch.Generator().manual_seed(1)) * 3 - 1
    (a, ga), (b, gb) = _both(backend, x, y, o, None, grad_out)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert ga.abs().sum() > 0


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_fused_weight_ignore_index_and_empty_classes(backend, binning):
    B, C, size = 2, 3, (5, 6)
    x, labels = _case(7, B, C, 1, size, torch.float32)
    labels[1, 0, :2] = 255
    w = torch.tensor([0.5, 2.0, 1.5])
    for ignore_empty in (True, False):
        o = Options(
            binning=binning,
            to_onehot_y=True,
            sigmoid=True,
            ignore_index=255,
            ignore_empty_classes=ignore_empty,
            backend=backend,
            reduction="none",
        )
        grad_out = torch.randn(B, C, generator=torch.Generator().manual_seed(2))
        (a, ga), (b, gb) = _both(backend, x, labels, o, w, grad_out)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_inputs_and_dense_targets(backend, dtype):
    x, labels = _case(3, 2, 4, 1, (6, 5), dtype)
    dense = torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1).float()
    o = Options(binning="soft", softmax=True, backend=backend, include_background=False)
    (a, ga), (b, gb) = _both(backend, x, dense, o, None, torch.tensor(2.5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert ga.dtype == dtype


@pytest.mark.parametrize("backend", KERNELS)
def test_fused_single_channel_binary_rule(backend):
    # C = 1 with a {0, 1} label map: the statistics run on [1 - p, p] with the background row dropped
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 6, 7, generator=g)
    y = torch.randint(0, 2, (2, 1, 6, 7), generator=g)
    o = Options(sigmoid=True, to_onehot_y=True, backend=backend)
    with pytest.warns(UserWarning, match="to_onehot_y=True` ignored"):
        (a, ga), (b, gb) = _both(backend, x, y, o, None, torch.tensor(1.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


def test_composed_path_where_the_fused_one_does_not_apply():
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 5, 4))
    o = Options(to_onehot_y=True, softmax=True, backend="reference")
    assert type(engine.loss(x, y, o).grad_fn).__name__ != "_FusedLossBackward"  # the reference: plain autograd
    if KERNELS:
        with torch.no_grad():  # nothing to differentiate: the op alone
            assert engine.loss(x, y, o.replace(backend=KERNELS[0])).grad_fn is None
        double = x.double().detach().requires_grad_(True)  # float64 under auto runs the reference
        assert type(engine.loss(double, y, o.replace(backend="auto")).grad_fn).__name__ != "_FusedLossBackward"
