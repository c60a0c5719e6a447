"""Public API surface: modules, presets, dispatcher rules, the command line check."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import calibops
from calibops import HardL1ACELoss, MarginalL1ACELoss, SoftL1ACELoss
from calibops import functional as F


def _case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, 5, generator=g)
    labels = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g)
    return logits, labels


def test_module_equals_functional():
    logits, labels = _case()
    for binning in ("hard", "soft"):
        m = MarginalL1ACELoss(binning=binning, to_onehot_y=True, softmax=True, backend="reference")
        f = F.marginal_l1_ace(logits, labels, binning=binning, to_onehot_y=True, softmax=True, backend="reference")
        assert m(logits, labels).item() == f.item()
    h = HardL1ACELoss(to_onehot_y=True, softmax=True, backend="reference")
    s = SoftL1ACELoss(to_onehot_y=True, softmax=True, backend="reference")
    assert h.binning == "hard" and s.binning == "soft"
    assert h(logits, labels).item() == MarginalL1ACELoss(to_onehot_y=True, softmax=True)(logits, labels).item()
    with pytest.raises(TypeError, match="binning"):
        HardL1ACELoss(binning="soft")


def test_weight_buffer_follows_module_and_scales():
    logits, labels = _case()
    m = MarginalL1ACELoss(to_onehot_y=True, softmax=True, weight=[1.0, 2.0, 0.0, 1.0], reduction="none")
    assert "weight" in dict(m.named_buffers())
    base = MarginalL1ACELoss(to_onehot_y=True, softmax=True, reduction="none")(logits, labels)
    out = m(logits, labels)
    torch.testing.assert_close(out, base * torch.tensor([1.0, 2.0, 0.0, 1.0]))


def test_defaults_follow_the_spec():
    m = MarginalL1ACELoss()
    assert (m.num_bins, m.binning, m.include_background, m.to_onehot_y, m.softmax, m.sigmoid) == (
        20,
        "hard",
        True,
        False,
        False,
        False,
    )
    assert (m.ignore_empty_classes, m.reduction, m.empty_weight, m.right, m.ignore_index, m.backend) == (
        True,
        "mean",
        0.01,
        False,
        None,
        "auto",
    )


def test_named_tuples():
    logits, labels = _case()
    s = F.binned_stats(logits, labels, to_onehot_y=True, softmax=True, num_bins=8)
    assert isinstance(s, calibops.BinnedStats)
    assert s.count.shape == s.sum_p.shape == s.sum_y.shape == (2, 4, 8)
    assert all(t.dtype == torch.float32 for t in s)
    e = F.calibration_errors(logits, labels, to_onehot_y=True, softmax=True)
    assert isinstance(e, calibops.CalibrationErrors)
    assert e.ece.shape == (2, 4) and not e.ece.requires_grad
    s2 = F.binned_stats(logits, labels, to_onehot_y=True, softmax=True, include_background=False)
    assert s2.count.shape == (2, 3, 20)


def test_sum_p_is_differentiable():
    logits, labels = _case()
    logits.requires_grad_(True)
    s = F.binned_stats(logits, labels, to_onehot_y=True, softmax=True)
    assert s.sum_p.requires_grad
    s.sum_p.sum().backward()
    # softmax rows sum to 1, so d/dx Σ_c Σ_j S_p = d/dx Σ_c p_c = 0
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-6, rtol=0)


def test_available_backends_and_backend_for(monkeypatch):
    avail = calibops.available_backends()
    assert set(avail) == {"reference", "cpu", "cuda", "triton"}
    assert avail["reference"] is None
    for why in avail.values():
        assert why is None or isinstance(why, str) and why
    x = torch.zeros(1)
    expected = "cpu" if avail["cpu"] is None else "reference"
    assert calibops.backend_for(x) == expected
    monkeypatch.setenv("CALIBOPS_BACKEND", "reference")
    assert calibops.backend_for(x) == "reference"
    monkeypatch.setenv("CALIBOPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        calibops.backend_for(x)


def test_single_channel_include_background_false_warns():
    x = torch.rand(2, 1, 5)
    y = (torch.rand(2, 1, 5) > 0.5).float()
    with pytest.warns(UserWarning, match="single channel"):
        out = F.marginal_l1_ace(x, y, include_background=False, reduction="none")
    assert out.shape == (2, 1)


def test_bool_and_uint8_targets_equal_float():
    logits, labels = _case()
    oh = torch.nn.functional.one_hot(labels[:, 0], 4).movedim(-1, 1)
    a = F.marginal_l1_ace(logits, oh.float(), softmax=True)
    b = F.marginal_l1_ace(logits, oh.bool(), softmax=True)
    c = F.marginal_l1_ace(logits, oh.to(torch.uint8), softmax=True)
    d = F.marginal_l1_ace(logits, labels, softmax=True, to_onehot_y=True)
    e = F.marginal_l1_ace(logits, labels.to(torch.uint8), softmax=True, to_onehot_y=True)
    assert a.item() == pytest.approx(b.item()) == pytest.approx(c.item())
    assert a.item() == pytest.approx(d.item()) == pytest.approx(e.item())


def test_autocast_cpu():
    logits, labels = _case()
    logits.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = logits * 1.0
        loss = F.marginal_l1_ace(z, labels, to_onehot_y=True, softmax=True)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None


def test_python_m_calibops_checks_backends():
    r = subprocess.run([sys.executable, "-m", "calibops"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"calibops {calibops.__version__} " in r.stdout and "reference" in r.stdout and "agree" in r.stdout
