"""The public surface of the v2 statistics engine: ``mode``, ``multi_rater`` and ``moments`` on the functional API
and ``DatasetCalibration`` (docs/statistics.md).

Each new statistic is checked through an identity with an independent formulation on the *same* public functions,
so a wrong shape, a wrong axis or a wrong definition fails:
- top-label statistics == marginal statistics of a one-channel problem whose probability is the confidence
  ``max_c p`` and whose dense target is ``[argmax == label]``;
- multi-rater loss == the loss against the dense rater-mean soft target (values and gradients);
- per-rater errors == the single-rater errors of each rater map;
- moments == the first moments of a problem whose "target" is chosen to make ``sum_y`` the moment.
Backends: every backend available here (the cross-backend kernel comparison is tests/test_conformance.py).
"""

from __future__ import annotations

import pytest
import torch

import calibops.functional as F
from calibops import DatasetCalibration, MarginalL1ACELoss
from calibops.backends.resolve import available_backends

BACKENDS = [b for b, why in available_backends().items() if why is None and b != "cuda"]


def _problem(B=2, C=4, S=(5, 7), R=3, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *S, generator=g) * 2.5
    t = torch.randint(0, C, (B, R, *S), generator=g)
    if ignore is not None:
        t[torch.rand(B, R, *S, generator=g) < 0.1] = ignore
    return x, t


def _close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_top_label_is_marginal_of_confidence(backend, binning):
    x, t = _problem(R=1)
    p = torch.softmax(x, 1)
    conf, a = p.max(1, keepdim=True)
    correct = (a == t).float()  # [B, 1, *S]
    top = F.binned_stats(p, t, to_onehot_y=True, mode="top_label", binning=binning, backend=backend, moments=True)
    ref = F.binned_stats(conf, correct, binning=binning, backend=backend, moments=True)
    assert top.count.shape == (2, 20) and top.sum_y.shape == (2, 20)
    for got, want in zip((*top, top.sum_p2, top.sum_py), (*ref, ref.sum_p2, ref.sum_py)):
        _close(got, want[:, 0])
    # the errors drop the class axis
    e = F.calibration_errors(p, t, to_onehot_y=True, mode="top_label", backend=backend)
    e_ref = F.calibration_errors(conf, correct, include_background=True, backend=backend)
    assert e.ece.shape == (2,)
    for u, v in zip(e, e_ref):
        _close(u, v[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_label_ties_take_the_lowest_class(backend):
    # two classes share the maximum; the argmax (lowest index) decides correctness
    p = torch.tensor([[[0.4, 0.2], [0.4, 0.5], [0.2, 0.3]]])  # [1, 3, 2]: voxel 0 ties classes 0 and 1
    lab0 = torch.tensor([[0, 1]])
    lab1 = torch.tensor([[1, 1]])
    s0 = F.binned_stats(p, lab0, to_onehot_y=True, mode="top_label", num_bins=4, backend=backend)
    s1 = F.binned_stats(p, lab1, to_onehot_y=True, mode="top_label", num_bins=4, backend=backend)
    # voxel 0 (conf 0.4, bin 1) is correct for label 0 only; voxel 1 (conf 0.5, bin 1 or 2) is correct in both
    assert float(s0.sum_y.sum()) == 2.0
    assert float(s1.sum_y.sum()) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_multi_rater_loss_is_loss_on_rater_mean(backend, binning):
    x, t = _problem(R=3)
    C = x.shape[1]
    y_mean = torch.nn.functional.one_hot(t, C).float().mean(1).movedim(-1, 1)  # [B, C, *S]
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    kw = {"softmax": True, "binning": binning, "backend": backend, "reduction": "none", "ignore_empty_classes": True}
    got = F.marginal_l1_ace(x1, t, to_onehot_y=True, multi_rater=True, **kw)
    want = F.marginal_l1_ace(x2, y_mean, **kw)
    _close(got, want)
    up = torch.rand_like(got) + 0.5  # grad_output != 1
    (got * up).sum().backward()
    (want * up).sum().backward()
    _close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    # the module front door passes it through
    loss = MarginalL1ACELoss(softmax=True, to_onehot_y=True, binning=binning, backend=backend, multi_rater=True)
    _close(loss(x, t), want.mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_per_rater_errors_are_single_rater_errors(backend, mode):
    x, t = _problem(R=3)
    e = F.calibration_errors(x, t, to_onehot_y=True, softmax=True, multi_rater=True, mode=mode, backend=backend)
    stats = F.binned_stats(x, t, to_onehot_y=True, softmax=True, multi_rater=True, mode=mode, backend=backend)
    R = t.shape[1]
    assert stats.sum_y.shape[-2] == R
    for r in range(R):
        single = F.calibration_errors(x, t[:, r], to_onehot_y=True, softmax=True, mode=mode, backend=backend)
        for u, v in zip(e, single):
            assert u.shape[1] == R
            _close(u[:, r], v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_rater_ignore_index_leaves_the_voxel_out_for_every_rater(backend):
    x, t = _problem(R=2, ignore=255)
    s = F.binned_stats(x, t, to_onehot_y=True, softmax=True, multi_rater=True, ignore_index=255, backend=backend)
    used = (t != 255).all(1)  # [B, *S]
    # hard counts per (image, class) = used voxels
    _close(s.count.sum(-1), used.flatten(1).sum(-1, keepdim=True).expand(-1, x.shape[1]).double())
    # each rater's sum_y counts its labels on the used voxels only
    for r in range(2):
        lab = torch.where(used, t[:, r], torch.full_like(t[:, r], 255))
        single = F.binned_stats(x, lab, to_onehot_y=True, softmax=True, ignore_index=255, backend=backend)
        _close(s.sum_y[:, :, r], single.sum_y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_moments_match_first_moments_of_rewritten_problems(backend, binning):
    # with probabilities q and a dense target y, sum_py = Σ w·q·y is sum_y of the target q·y, and sum_p2 = Σ w·q²
    # is sum_y of the target q² (both targets lie in [0, 1])
    g = torch.Generator().manual_seed(3)
    q = torch.rand(2, 3, 40, generator=g)
    y = torch.rand(2, 3, 40, generator=g)
    m = F.binned_stats(q, y, binning=binning, moments=True, backend=backend)
    assert m.sum_p2.shape == m.sum_p.shape == m.sum_py.shape == (2, 3, 20)
    _close(m.sum_py, F.binned_stats(q, q * y, binning=binning, backend=backend).sum_y)
    _close(m.sum_p2, F.binned_stats(q, q * q, binning=binning, backend=backend).sum_y)
    # the three original statistics do not change when moments are asked
    for u, v in zip(m, F.binned_stats(q, y, binning=binning, backend=backend)):
        assert torch.equal(u, v)


def test_binned_stats_unpacks_into_three_and_carries_moments():
    x, t = _problem(R=1)
    s = F.binned_stats(x, t, to_onehot_y=True, softmax=True)
    count, sum_p, sum_y = s
    assert s.sum_p2 is None and s.sum_py is None
    m = F.binned_stats(x, t, to_onehot_y=True, softmax=True, moments=True)
    count2, sum_p2_, sum_y2 = m
    assert torch.equal(count, count2) and isinstance(m, F.BinnedStats) and len(m) == 3
    assert m.sum_p2 is not None and "sum_p2" in repr(m)


def test_option_errors_name_the_argument():
    x, t = _problem(R=3)
    with pytest.raises(ValueError, match="multi_rater=True"):
        F.binned_stats(x, t, to_onehot_y=True, softmax=True)
    with pytest.raises(ValueError, match="to_onehot_y=True"):
        F.binned_stats(x, t.float(), softmax=True, multi_rater=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        F.binned_stats(x, t[:, 0], to_onehot_y=True, mode="toplabel")
    with pytest.raises(TypeError, match="moments"):
        F.binned_stats(x, t[:, 0], to_onehot_y=True, moments="yes")
    with pytest.raises(ValueError, match=r"\(B, R, \*spatial\)"):
        F.binned_stats(x, t[:, :, :, :3], to_onehot_y=True, softmax=True, multi_rater=True)
    with pytest.raises(ValueError, match="dice"):
        DatasetCalibration(4, to_onehot_y=True, mode="top_label", dice=True, keep_records=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dataset_calibration_top_label(backend):
    x, t = _problem(R=1, B=3)
    t = t[:, 0]
    m = DatasetCalibration(4, to_onehot_y=True, softmax=True, mode="top_label", backend=backend, keep_records=True)
    m.update(x[:2], t[:2])
    m.update(x[2:], t[2:])
    res = m.compute()
    assert res.micro.ece.shape == () and res.macro.ace.shape == () and res.classes == ()
    assert m.histogram().shape == (20, 20)
    stats = F.binned_stats(x, t, to_onehot_y=True, softmax=True, mode="top_label", backend=backend)
    pooled = F.BinnedStats(*(s.double().sum(0) for s in stats))
    from calibops.results import calibration_errors_from_stats

    for u, v in zip(res.micro, calibration_errors_from_stats(pooled)):
        _close(u, v)
    per_image = F.calibration_errors(x, t, to_onehot_y=True, softmax=True, mode="top_label", backend=backend)
    for u, v in zip(res.macro, per_image):
        _close(u, v.double().mean())
    assert [r["class"] for r in m._records] == ["top_label"] * 3
    # a checkpoint round-trips, and one written before modes existed loads as marginal
    m2 = DatasetCalibration(4, to_onehot_y=True, softmax=True, mode="top_label", backend=backend)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.histogram(), m.histogram())
    marg = DatasetCalibration(4, to_onehot_y=True, softmax=True, backend=backend)
    sd = marg.state_dict()
    del sd["config"]["mode"]
    marg.load_state_dict(sd)
    with pytest.raises(ValueError, match="config"):
        m2.load_state_dict(sd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float64])
def test_dense_targets_of_any_real_dtype_equal_float32(backend, dtype):
    # v1 accepted integer one-hot targets on every backend; the v2 op takes a fixed set of dense dtypes, so the
    # public layer converts the others (a regression caught by the MONAI parity tests)
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(2, 3, 6, 5, generator=g), 1)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 6, 5), generator=g), 3).movedim(-1, 1)
    want = F.marginal_l1_ace(p, onehot.float(), backend=backend, reduction="none")
    got = F.marginal_l1_ace(p, onehot.to(dtype), backend=backend, reduction="none")
    assert torch.equal(got, want)
