"""Hardening of the evaluation layer (issue 24): exact counts, left-out voxels, argument checks, bootstrap limits.

Every test here failed on v0.2 (commit bb71170) and states the wrong behaviour it guards against.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import calibops.functional as F
from calibops.evaluation import crps_gaussian


# ------------------------------------------------------------------ volume CRPS counts rater volumes exactly
def test_volume_crps_counts_rater_volumes_exactly_above_2_pow_24_voxels():
    """Two raters one voxel apart above 2**24 voxels: float32 sums made both volumes 2**24 (sigma 0, CRPS off by
    the whole 1/sqrt(pi)-term); the exact counts give sigma = 0.5."""
    n = 2**24 + 2
    x = torch.full((1, 2, n), 0.5)
    t = torch.zeros(1, 2, n, dtype=torch.uint8)
    t[0, 0, : 2**24 + 1] = 1  # rater 0: 2**24 + 1 voxels of class 1 (not a float32)
    t[0, 1, : 2**24] = 1  # rater 1: 2**24 voxels
    got = F.volume_crps(x, t, to_onehot_y=True, backend="cpu")
    fg = torch.tensor([2**24 + 1, 2**24], dtype=torch.float64)
    vols = torch.stack([n - fg, fg])  # (C, R)
    v = torch.full((2,), n * 0.5, dtype=torch.float64)
    want = crps_gaussian(v, vols.mean(-1), vols.var(-1, unbiased=False).sqrt())
    assert float(vols[1].std(unbiased=False)) == 0.5
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=1e-6)


def _exact_path(monkeypatch):
    """Force volume_crps onto its exact counting path (taken above 2**24 voxels) for small test volumes."""
    monkeypatch.setattr(F, "_EXACT_FLOAT32_COUNT", 0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_volume_crps_exact_counts_leave_out_the_voxels_the_statistics_leave_out(monkeypatch, backend):
    """The exact counting path keeps the statistics' rule: a voxel counts only where every rater's label is valid
    and not ignore_index, and (validate=False) only where the class's probability is finite."""
    torch.manual_seed(0)
    B, C, R, sp = 2, 4, 3, (5, 6, 7)
    x = torch.randn(B, C, *sp)
    t = torch.randint(0, C, (B, R, *sp))
    t[0, 1, 0, 0, :3] = 99  # ignore_index / out of range in one rater: the voxel is left out for every rater
    t[1, 2, 1, 1, :2] = 7
    xn = x.clone()
    xn[0, :, 2, 2, 2] = float("nan")  # softmax: the whole voxel; sigmoid: per class
    xn[1, 2, 3, 3, 3] = float("nan")
    cases = [
        dict(softmax=True),
        dict(softmax=True, include_background=False),
        dict(softmax=True, ignore_index=99),
        dict(sigmoid=True, ignore_index=7),
    ]
    for kw in cases:
        for inp in (x, xn):
            want = F.volume_crps(inp, t, to_onehot_y=True, validate=False, backend=backend, **kw)
            with monkeypatch.context() as m:
                _exact_path(m)
                got = F.volume_crps(inp, t, to_onehot_y=True, validate=False, backend=backend, **kw)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    # one channel (MONAI's binary rule): labels {0, 1}, a bad label and a NaN logit left out
    xb = torch.randn(B, 1, *sp)
    tb = torch.randint(0, 2, (B, R, *sp))
    tb[0, 0, 0, 0, 0] = 5
    xb[0, 0, 1, 1, 1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.volume_crps(xb, tb, to_onehot_y=True, sigmoid=True, validate=False, backend=backend)
        with monkeypatch.context() as m:
            _exact_path(m)
            got = F.volume_crps(xb, tb, to_onehot_y=True, sigmoid=True, validate=False, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    # dense soft targets: float64 sums (the float32 statistics agree to float32 rounding)
    p, y = torch.softmax(x, 1), torch.softmax(3 * torch.randn(B, C, *sp), 1)
    p[0, 1, 1, 1, 1] = float("nan")
    want = F.volume_crps(p, y, validate=False, include_background=False, backend=backend)
    with monkeypatch.context() as m:
        _exact_path(m)
        got = F.volume_crps(p, y, validate=False, include_background=False, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rater_label_counts_against_a_one_hot_count():
    from calibops.evaluation import rater_label_counts

    torch.manual_seed(1)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int64, torch.bool):
        hi = 2 if dtype == torch.bool else 6
        t = torch.randint(0, hi, (3, 2, 40, 9)).to(dtype)
        if dtype == torch.int8:
            t[0, 0, 0, :4] = -3
        keep = torch.rand(3, 5, 360) > 0.2
        for ii in (None, 4):
            got = rater_label_counts(t, 5, ii, keep)
            lab = t.reshape(3, 2, -1).long()
            ok = (lab >= 0) & (lab < 5) & ((lab != ii) if ii is not None else True)
            used = ok.all(1, keepdim=True)
            hit = lab.unsqueeze(1) == torch.arange(5).view(1, 5, 1, 1)  # (B, C, R, N)
            want = (hit & used.unsqueeze(1) & keep.unsqueeze(2)).sum(-1)
            assert got.dtype == torch.int64 and torch.equal(got, want), (dtype, ii)
    with pytest.raises(ValueError, match="keep"):
        rater_label_counts(torch.zeros(1, 1, 4, dtype=torch.int64), 2, keep=torch.ones(1, 3, 4, dtype=torch.bool))


# ------------------------------------------------------------------ Brier: a left-out voxel's y² is left out too
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_brier_dense_target_leaves_out_the_y2_of_a_non_finite_voxel(mode, backend):
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(2, 3, 50), 1)
    y = torch.softmax(3 * torch.randn(2, 3, 50), 1)
    pn = p.clone()
    pn[0, :, 7] = float("nan")
    pn[1, 2, 11] = float("inf")
    got = F.brier_score(pn, y, validate=False, mode=mode, backend=backend)
    keep0 = torch.arange(50) != 7
    torch.testing.assert_close(got[0], F.brier_score(p[:1, :, keep0], y[:1, :, keep0], mode=mode)[0])
    if mode == "marginal":  # per class: only class 2 of image 1 loses voxel 11
        keep1 = torch.arange(50) != 11
        torch.testing.assert_close(got[1, :2], F.brier_score(p[1:], y[1:])[0, :2])
        torch.testing.assert_close(got[1, 2], F.brier_score(p[1:, :, keep1], y[1:, :, keep1])[0, 2])
    else:
        keep1 = torch.arange(50) != 11
        torch.testing.assert_close(got[1], F.brier_score(p[1:, :, keep1], y[1:, :, keep1], mode=mode)[0])


# ------------------------------------------------------------------ spacing: a bool is not a voxel size
@pytest.mark.parametrize("spacing", [True, False, (1.0, True), np.bool_(True), torch.tensor([True, True])])
def test_volume_crps_refuses_a_bool_spacing(spacing):
    x = torch.softmax(torch.randn(1, 2, 4, 4), 1)
    t = torch.randint(0, 2, (1, 2, 4, 4))
    with pytest.raises(TypeError, match="bool is not a voxel size"):
        F.volume_crps(x, t, to_onehot_y=True, spacing=spacing)
    torch.testing.assert_close(
        F.volume_crps(x, t, to_onehot_y=True, spacing=2), 4 * F.volume_crps(x, t, to_onehot_y=True)
    )


# ------------------------------------------------------------------ bootstrap: arguments, limits, bounded memory
def _small_metric(n=12, groups=("a", "b")):
    from calibops.metrics import DatasetCalibration

    torch.manual_seed(3)
    m = DatasetCalibration(3, to_onehot_y=True, keep_records=True, groups=groups)
    for i in range(n):
        x = torch.softmax(torch.randn(1, 3, 6, 5), 1)
        t = torch.randint(0, 3, (1, 6, 5))
        m.update(x, t, image_ids=[f"c{i}"], groups=[groups[i % len(groups)]])
    return m


def test_bootstrap_accepts_numpy_integers_and_refuses_bad_seeds_with_a_clear_error():
    m = _small_metric()
    a = m.bootstrap("ece", num_samples=np.int64(10), seed=np.int64(4))
    b = m.bootstrap("ece", num_samples=10, seed=4)
    torch.testing.assert_close(a["gap"].lower, b["gap"].lower)
    for seed, err, match in [
        (2**64, ValueError, r"seed must be an int in \[0, 2\*\*63 - 1\], got 18446744073709551616"),
        (-1, ValueError, "seed must be an int in"),
        (1.5, TypeError, "seed must be an int"),
        (True, TypeError, "seed must be an int"),
    ]:
        with pytest.raises(err, match=match):
            m.bootstrap("ece", num_samples=10, seed=seed)
    with pytest.raises(ValueError, match="num_samples must be between 1 and 100000"):
        m.bootstrap("ece", num_samples=100_001)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        m.bootstrap("ece", num_samples=10.0)


def test_bootstrap_resamples_in_bounded_chunks_with_the_same_draws(monkeypatch):
    import calibops.evaluation as E

    torch.manual_seed(4)
    v = torch.randn(50, 7, dtype=torch.float64)
    v[3, 2] = float("nan")
    whole = E.bootstrap_ci(v, num_samples=300, seed=9)
    calls = []
    real = torch.randint

    def counting(*args, **kwargs):
        calls.append(args[-1] if isinstance(args[-1], tuple) else kwargs.get("size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(E, "_BOOTSTRAP_CHUNK", 50 * 7 * 16)  # 16 resamples at a time
    monkeypatch.setattr(E.torch, "randint", counting)
    chunked = E.bootstrap_ci(v, num_samples=300, seed=9)
    assert len(calls) == 19 and max(c[0] for c in calls) == 16  # never more than a chunk of resamples at once
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)  # the same draws as one (num_samples, n) call


def test_bootstrap_interval_carries_its_number_of_images_and_warns_below_the_minimum():
    from calibops.evaluation import MIN_BOOTSTRAP_IMAGES, BootstrapWarning, bootstrap_ci

    v = torch.randn(30, 3, dtype=torch.float64)
    v[:25, 1] = float("nan")  # class 1 has 5 images
    with pytest.warns(BootstrapWarning, match="from 5 image"):
        ci = bootstrap_ci(v, num_samples=50)
    assert ci.num_images.tolist() == [30, 5, 30]
    est, lo, hi = ci  # still three fields
    with pytest.warns(BootstrapWarning, match="zero-width"):
        one = bootstrap_ci(v[:1, [0]], num_samples=50)
    assert float(one.lower) == float(one.upper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bootstrap_ci(v[:MIN_BOOTSTRAP_IMAGES, [0]], num_samples=20)  # at the minimum: no warning


def test_group_gap_bootstrap_resamples_in_bounded_chunks_with_the_same_draws(monkeypatch):
    import calibops.evaluation as E

    m = _small_metric(n=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.BootstrapWarning)
        whole = m.bootstrap("ece", num_samples=200, seed=5)
        sizes = []
        real = torch.randint
        monkeypatch.setattr(E, "_BOOTSTRAP_CHUNK", 12 * 2 * 8)  # 8 resamples of a 12-image group at a time
        monkeypatch.setattr(E.torch, "randint", lambda *a, **k: sizes.append(a[2][0]) or real(*a, **k))
        chunked = m.bootstrap("ece", num_samples=200, seed=5)
    assert sizes and max(sizes) <= 16
    for key in ("all", "gap"):
        for a, b in zip(whole[key], chunked[key], strict=True):
            assert torch.equal(a, b), key
