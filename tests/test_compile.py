"""torch.compile(fullgraph=True) sees through the loss on every backend available here."""

from __future__ import annotations

import pytest
import torch

import calibops
from calibops import MarginalL1ACELoss


def _runnable_backends():
    out = []
    x = torch.zeros(1)
    for name in ("reference", "cpu", "triton"):
        try:
            calibops.backend_for(x, name)
            out.append(name)
        except RuntimeError:
            pass
    return out


@pytest.mark.parametrize("backend", _runnable_backends())
@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_compile_fullgraph_matches_eager(backend, binning):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=g)
    labels = torch.randint(0, 3, (2, 1, 6, 5), generator=g)
    loss_fn = MarginalL1ACELoss(binning=binning, to_onehot_y=True, softmax=True, num_bins=8, backend=backend)

    def step(x, y):
        loss = loss_fn(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    x_e = logits.clone().requires_grad_(True)
    loss_e, grad_e = step(x_e, labels)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x_c = logits.clone().requires_grad_(True)
    loss_c = compiled(x_c, labels)
    (grad_c,) = torch.autograd.grad(loss_c, x_c)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-7)
