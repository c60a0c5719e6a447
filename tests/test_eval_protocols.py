"""Evaluation protocols (docs/evaluation.md) against independent oracles.

Oracles: NumPy float64 loops written from the definitions (per voxel, per bin, per rater), torchmetrics'
``MulticlassCalibrationError`` (top-label ECE / L2 / max), ``properscoring.crps_gaussian`` (closed-form CRPS) and
SciPy's ``quad`` over the CURVAS interpolated CDF (the truncated CRPS). Backends: every backend available here.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

import calibops
import calibops.functional as F
from calibops.evaluation import (
    adaptive_calibration_errors,
    bootstrap_ci,
    brier_decomposition,
    consensus_masks,
    crps_curvas,
    crps_gaussian,
    pool_stats,
)
from calibops.results import CalibrationErrors, calibration_errors_from_stats

BACKENDS = [b for b in ("reference", "cpu", "triton") if calibops.available_backends()[b] is None]
EPS32 = float(np.finfo(np.float32).eps)


def _bins(q: np.ndarray, M: int) -> np.ndarray:
    """calibops' hard bins of float32 values q (bins (e_j, e_j+1], edges linspace(0, 1 + eps32, M + 1))."""
    edges = torch.linspace(0.0, 1.0 + EPS32, M + 1, dtype=torch.float32)[1:].double().numpy()
    return np.minimum(np.searchsorted(edges, q.astype(np.float32).astype(np.float64), side="left"), M - 1)


def _np_errors(q: np.ndarray, y: np.ndarray, M: int) -> tuple[float, float, float, float]:
    """ECE, ACE, MCE, L2 of entries (q, y) by a loop over bins, float64."""
    b = _bins(q, M)
    N = len(q)
    if N == 0:
        return (math.nan,) * 4
    ece = l2 = 0.0
    gaps = []
    for j in range(M):
        sel = b == j
        n = int(sel.sum())
        if n == 0:
            continue
        gap = abs(q[sel].astype(np.float64).mean() - y[sel].astype(np.float64).mean())
        gaps.append(gap)
        ece += n * gap / N
        l2 += n * gap * gap / N
    return ece, float(np.mean(gaps)), float(np.max(gaps)), math.sqrt(l2)


def _problem(B=2, C=4, S=(9, 11), R=1, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *S, generator=g) * 2.0
    t = torch.randint(0, C, (B, R, *S), generator=g)
    if ignore is not None:
        t[torch.rand(t.shape, generator=g) < 0.1] = ignore
    return x, t


# ------------------------------------------------------------------------------------------------ L2
def test_l2_keeps_three_field_unpacking_and_survives_pickle_and_replace():
    x, t = _problem()
    errs = F.calibration_errors(x, t, include_background=False, to_onehot_y=True, softmax=True, backend="reference")
    ece, ace, mce = errs
    assert len(errs) == 3 and errs.l2.shape == ece.shape == (2, 3)
    back = pickle.loads(pickle.dumps(errs))
    assert torch.equal(back.l2, errs.l2) and torch.equal(back.ece, ece)
    assert errs._replace(ece=ace).l2 is None  # rebuilt tuples fall back to the class default
    assert CalibrationErrors(ece, ace, mce).l2 is None
    assert torch.equal(errs.map(lambda e: e * 2).l2, errs.l2 * 2)
    assert "l2=" in repr(errs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_l2_and_errors_match_numpy_loop(backend, mode):
    x, t = _problem(seed=3, ignore=255)
    M = 13
    bg = {} if mode == "top_label" else {"include_background": False}  # classes 1..C-1 (top-label: no class)
    errs = F.calibration_errors(
        x, t, num_bins=M, to_onehot_y=True, softmax=True, ignore_index=255, mode=mode, backend=backend, **bg
    )
    p = torch.softmax(x.float(), 1).numpy()
    lab = t[:, 0].numpy()
    for b in range(x.shape[0]):
        used = lab[b] != 255
        if mode == "top_label":
            q = p[b].max(0)[used]
            y = (p[b].argmax(0) == lab[b])[used]
            want = _np_errors(q, y, M)
            got = [float(e[b]) for e in (*errs, errs.l2)]
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        else:
            for k, c in enumerate(range(1, x.shape[1])):
                want = _np_errors(p[b, c][used], (lab[b] == c)[used], M)
                got = [float(e[b, k]) for e in (*errs, errs.l2)]
                np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- torchmetrics parity
def _dyadic_probs(B, C, S, seed):
    """Probabilities k/1024: every float32 sum of up to 2^14 of them is exact, so torchmetrics' float32 bin sums
    carry no rounding, and no value lies within 6e-5 of an edge j/15 (|k/1024 - j/15| >= 1/15360)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1024, (B, C, *S), generator=g).float() / 1024, g


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_label_pooled_matches_torchmetrics(backend):
    tm = pytest.importorskip("torchmetrics.classification")
    B, C, S, M = 3, 4, (24, 31), 15
    p, g = _dyadic_probs(B, C, S, 1)
    t = torch.randint(0, C, (B, *S), generator=g)
    stats = F.binned_stats(p, t, num_bins=M, to_onehot_y=True, mode="top_label", backend=backend)
    errs = calibration_errors_from_stats(pool_stats(stats))
    flat_p, flat_t = p.movedim(1, -1).reshape(-1, C), t.reshape(-1)
    for norm, ours in (("l1", errs.ece), ("l2", errs.l2), ("max", errs.mce)):
        ref = tm.MulticlassCalibrationError(num_classes=C, n_bins=M, norm=norm)(flat_p, flat_t)
        # error budget: exact bin sums on both sides; torchmetrics divides and reduces in float32 (a few ulp)
        assert abs(float(ours) - float(ref)) <= 1e-6, (norm, float(ours), float(ref))
    # the same through DatasetCalibration (micro = pooled)
    m = calibops.DatasetCalibration(C, num_bins=M, to_onehot_y=True, mode="top_label", backend=backend)
    m.update(p, t)
    res = m.compute()
    ref = tm.MulticlassCalibrationError(num_classes=C, n_bins=M, norm="l2")(flat_p, flat_t)
    assert abs(float(res.micro.l2) - float(ref)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 2])
def test_top_label_pooled_matches_torchmetrics_on_softmax_probabilities(backend, seed):
    tm = pytest.importorskip("torchmetrics.classification")
    C, M = 5, 15
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(4, C, 32, 32, 8, generator=g), 1)
    t = torch.randint(0, C, (4, 32, 32, 8), generator=g)
    # the edge conventions differ only for confidences between j/M and calibops' edge j(1 + eps32)/M: leave every
    # voxel within 1e-6 of an edge out on both sides (seed 2 has 4 such voxels, which move the MCE by 7e-5)
    q = p.max(1).values.double()
    near = ((q * M - torch.round(q * M)).abs() / M) < 1e-6
    t = torch.where(near, torch.full_like(t, -1), t)
    errs = calibration_errors_from_stats(
        pool_stats(
            F.binned_stats(p, t, num_bins=M, to_onehot_y=True, mode="top_label", ignore_index=-1, backend=backend)
        )
    )
    flat_p, flat_t = p.movedim(1, -1).reshape(-1, C), t.reshape(-1)
    for norm, ours in (("l1", errs.ece), ("l2", errs.l2), ("max", errs.mce)):
        ref = tm.MulticlassCalibrationError(num_classes=C, n_bins=M, norm=norm, ignore_index=-1)(flat_p, flat_t)
        # budget: torchmetrics adds each bin's ~2000 float32 confidences in float32 (relative rounding of a bin mean
        # ~ sqrt(n) eps32 ~ 5e-6 at worst, measured <= 1e-6); calibops' side is exact to float64
        assert abs(float(ours) - float(ref)) <= 5e-6, (norm, float(ours), float(ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_curvas_multirater_ece_is_mean_of_per_rater_torchmetrics(backend):
    tm = pytest.importorskip("torchmetrics.classification")
    B, C, S, M, R = 2, 4, (10, 9, 7), 50, 3
    p, g = _dyadic_probs(B, C, S, 2)
    t = torch.randint(0, C, (B, R, *S), generator=g)
    e = F.calibration_errors(p, t, num_bins=M, to_onehot_y=True, mode="top_label", multi_rater=True, backend=backend)
    assert e.ece.shape == (B, R)
    for b in range(B):
        flat = p[b].reshape(C, -1).t()
        ref = [float(tm.MulticlassCalibrationError(C, n_bins=M)(flat, t[b, r].reshape(-1))) for r in range(R)]
        # |k/1024 - j/50| >= 1/(1024*25) away from edges: parity holds; the CURVAS number is the rater mean
        np.testing.assert_allclose(e.ece[b].double().numpy(), ref, atol=1e-6, rtol=0)
        assert abs(float(e.ece[b].double().mean()) - np.mean(ref)) <= 1e-6


def test_torchmetrics_edge_convention_difference_is_as_documented():
    tm = pytest.importorskip("torchmetrics.classification")
    # q = 0.5 sits exactly on the edge 1/2 of M = 2 bins; q = 1.0 on the last edge
    p = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).view(1, 2, 2)  # voxel 0: q = 0.5 (class 0), voxel 1: q = 1.0
    t = torch.tensor([[1, 0]])
    ours = F.binned_stats(p, t, num_bins=2, to_onehot_y=True, mode="top_label", backend="reference")
    # calibops bins (e_j, e_j+1]: 0.5 goes to bin 0, 1.0 to the last bin
    assert ours.count[0].tolist() == [1.0, 1.0]
    e = calibration_errors_from_stats(pool_stats(ours))
    ref = tm.MulticlassCalibrationError(num_classes=2, n_bins=2, norm="max")(p[0].t(), t[0])
    # torchmetrics bins [e_j, e_j+1) with 1.0 in an extra bin: both voxels in bins 1 and 2, same gaps here
    assert float(e.mce) == pytest.approx(float(ref))
    # ... but they differ once an edge value is pooled with others: q = 0.5 joins the upper bin in torchmetrics
    p2 = torch.tensor([[0.5, 0.8], [0.5, 0.2]]).view(1, 2, 2)
    t2 = torch.tensor([[1, 0]])
    ours2 = calibration_errors_from_stats(
        pool_stats(F.binned_stats(p2, t2, num_bins=2, to_onehot_y=True, mode="top_label", backend="reference"))
    )
    ref2 = tm.MulticlassCalibrationError(num_classes=2, n_bins=2, norm="l1")(p2[0].t(), t2[0])
    assert float(ours2.ece) == pytest.approx(0.5 * 0.5 + 0.5 * 0.2)  # two bins of one voxel each
    assert float(ref2) == pytest.approx(abs(0.65 - 0.5))  # one bin: mean confidence 0.65, accuracy 1/2


# ---------------------------------------------------------------------------------------------- Brier
def _np_brier(p, lab, C, mode, raters, ignore=None, include_background=False):
    """(B, C') or (B,) Brier scores, float64 loop over images, classes and raters; lab (B, R, N)."""
    B = p.shape[0]
    out = []
    for b in range(B):
        used = np.all(lab[b] != ignore, 0) if ignore is not None else np.ones(lab.shape[-1], bool)
        if not used.any():
            out.append(np.nan if mode == "top_label" else [np.nan] * (C if include_background else C - 1))
            continue
        if mode == "top_label":
            q = p[b].max(0)[used]
            a = p[b].argmax(0)[used]
            vals = [np.mean((q - (a == lab[b, r][used])) ** 2) for r in range(raters)]
            out.append(np.mean(vals))
        else:
            cls = range(C) if include_background else range(1, C)
            row = []
            for c in cls:
                vals = [np.mean((p[b, c][used] - (lab[b, r][used] == c)) ** 2) for r in range(raters)]
                row.append(np.mean(vals))
            out.append(row)
    return np.array(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
@pytest.mark.parametrize("raters", [1, 3])
def test_brier_score_matches_numpy_loop(backend, mode, raters):
    x, t = _problem(B=3, C=4, S=(7, 6), R=raters, seed=5, ignore=255)
    t[2] = 255  # an image with no used voxel: NaN
    got = F.brier_score(
        x,
        t if raters > 1 else t[:, 0],
        mode=mode,
        to_onehot_y=True,
        softmax=True,
        ignore_index=255,
        multi_rater=raters > 1,
        backend=backend,
        **({} if mode == "top_label" else {"include_background": False}),  # classes 1..C-1
    )
    p = torch.softmax(x.float(), 1).double().flatten(2).numpy()
    want = _np_brier(p, t.reshape(3, raters, -1).numpy(), 4, mode, raters, ignore=255)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_brier_score_dense_soft_target_and_gradient(mode):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 3, 5, 4, generator=g, dtype=torch.float64)
    got = F.brier_score(x, y, mode=mode, softmax=True, include_background=True, backend="reference")
    p = torch.softmax(x, 1)
    if mode == "top_label":
        q, a = p.max(1)
        want = ((q - y.gather(1, a.unsqueeze(1))[:, 0]) ** 2).flatten(1).mean(1)
    else:
        want = ((p - y) ** 2).flatten(2).mean(2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * w).sum(), x)
    (g2,) = torch.autograd.grad((want * w).sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("raters", [1, 3])
def test_brier_decomposition_matches_numpy_terms(raters):
    x, t = _problem(B=2, C=3, S=(20, 15), R=raters, seed=9)
    M = 10
    kw = {"to_onehot_y": True, "softmax": True, "num_bins": M, "moments": True, "backend": "reference"}
    s = F.binned_stats(x, t if raters > 1 else t[:, 0], multi_rater=raters > 1, **kw)
    d = brier_decomposition(s)
    p = torch.softmax(x.float(), 1).double().flatten(2).numpy()
    lab = t.reshape(2, raters, -1).numpy()
    for b in range(2):
        for c in range(3):  # binned_stats keeps the background (include_background=True by default)
            k = c
            q = p[b, c]
            bins = _bins(q, M)
            terms = np.zeros(6)
            for r in range(raters):
                y = (lab[b, r] == c).astype(np.float64)
                N, o = len(q), y.mean()
                rel = res = wbv = wbc = 0.0
                for j in range(M):
                    sel = bins == j
                    if not sel.any():
                        continue
                    qb, yb = q[sel].mean(), y[sel].mean()
                    rel += sel.sum() * (qb - yb) ** 2 / N
                    res += sel.sum() * (yb - o) ** 2 / N
                    wbv += ((q[sel] - qb) ** 2).sum() / N
                    wbc += 2 * ((q[sel] - qb) * (y[sel] - yb)).sum() / N
                terms += [np.mean((q - y) ** 2), rel, res, o * (1 - o), wbv, wbc]
            terms /= raters
            got = [float(v[b, k]) for v in d]
            np.testing.assert_allclose(got, terms, atol=2e-6, rtol=0)
            # the identity the decomposition states
            assert abs(got[1] - got[2] + got[3] + got[4] - got[5] - got[0]) < 1e-6
    with pytest.raises(ValueError, match="moments=True"):
        brier_decomposition(F.binned_stats(x, t[:, 0], to_onehot_y=True, softmax=True, backend="reference"))


# ---------------------------------------------------------------------------------------------- CRPS
def _np_volumes(p, lab, C, vox):
    """Predicted and rater volumes by loops: (B, C) and (B, C, R)."""
    B, R = lab.shape[:2]
    v = np.array([[p[b, c].sum() * vox[b] for c in range(C)] for b in range(B)])
    V = np.array([[[np.sum(lab[b, r] == c) * vox[b] for r in range(R)] for c in range(C)] for b in range(B)])
    return v, V


@pytest.mark.parametrize("backend", BACKENDS)
def test_volume_crps_closed_form_matches_properscoring(backend):
    ps = pytest.importorskip("properscoring")
    x, t = _problem(B=3, C=4, S=(6, 7, 5), R=3, seed=11)
    t[1] = t[1, :1]  # image 1: the raters agree, sigma = 0
    spacing = torch.tensor([[1.0, 0.5, 2.0], [0.8, 0.8, 3.0], [1.2, 1.0, 1.0]], dtype=torch.float64)
    got = F.volume_crps(
        x, t, spacing=spacing, to_onehot_y=True, include_background=False, softmax=True, backend=backend
    )
    p = torch.softmax(x.float(), 1).double().numpy()
    vox = spacing.prod(1).numpy()
    v, counts = _np_volumes(p, t.numpy(), 4, np.ones(3))
    v = v * vox[:, None]
    # NumPy's std is the population std; on integer voxel counts, equal volumes give exactly 0
    mu, sd = counts.mean(-1) * vox[:, None], counts.std(-1) * vox[:, None]
    # budget: the predicted volume is a float32 sum (rounded once by the reference; blocked float32 sums in the
    # kernels): relative error well below 1e-6, and |dCRPS/dv| <= 1, so the CRPS is within 1e-6 * |v|
    atol = 1e-6 * np.abs(v).max()
    pos = sd[:, 1:] > 0
    want = ps.crps_gaussian(v[:, 1:][pos], mu[:, 1:][pos], sd[:, 1:][pos])
    np.testing.assert_allclose(got.numpy()[pos], want, rtol=0, atol=atol)
    assert np.all(sd[1] == 0) and pos.sum() == 6  # image 1: a point mass, the limit |v - mu|
    np.testing.assert_allclose(got[1].numpy(), np.abs(v - mu)[1, 1:], rtol=0, atol=atol)


def test_volume_crps_spacing_forms_and_gradient():
    x, t = _problem(B=2, C=3, S=(5, 6), R=2, seed=12)
    kw = {"to_onehot_y": True, "include_background": False, "softmax": True}  # rater label maps, classes 1..C-1
    base = F.volume_crps(x, t, backend="reference", **kw)
    # crps scales with the voxel volume: spacing (2, 3) = volume 6 everywhere
    torch.testing.assert_close(F.volume_crps(x, t, spacing=(2.0, 3.0), backend="reference", **kw), 6 * base)
    torch.testing.assert_close(F.volume_crps(x, t, spacing=2.0, backend="reference", **kw), 4 * base)
    # one rater map (B, *spatial) = R = 1: |v - V|
    one = F.volume_crps(x, t[:, 0], backend="reference", **kw)
    p = torch.softmax(x.double(), 1)
    V = torch.stack([(t[:, 0] == c).double().flatten(1).sum(1) for c in range(3)], 1)
    torch.testing.assert_close(one, (p.flatten(2).sum(2) - V)[:, 1:].abs(), rtol=1e-6, atol=1e-5)
    # differentiable (a volume loss): against autograd of the closed form on directly computed volumes
    xd = x.double().requires_grad_(True)
    got = F.volume_crps(xd, t, backend="reference", **kw).sum()
    (g1,) = torch.autograd.grad(got, xd)
    xd2 = x.double().requires_grad_(True)
    v = torch.softmax(xd2, 1).flatten(2).sum(2)[:, 1:]
    Vr = torch.stack([(t == c).double().flatten(2).sum(2) for c in range(1, 3)], 1)
    want = crps_gaussian(v, Vr.mean(-1), Vr.var(-1, unbiased=False).sqrt()).sum()
    (g2,) = torch.autograd.grad(want, xd2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    for bad, exc in (((1.0,), ValueError), ((1.0, -1.0), ValueError), ("a", TypeError)):
        with pytest.raises(exc, match="spacing"):
            F.volume_crps(x, t, spacing=bad, **kw)
    with pytest.raises(ValueError, match="method"):
        F.volume_crps(x, t, method="quad", **kw)


def _curvas_quad(v, mu, sd):
    """The CURVAS 2024 CRPS as described: SciPy's interpolated Gaussian CDF, quad over mu +- 3 sd."""
    from scipy.integrate import quad
    from scipy.interpolate import interp1d
    from scipy.stats import norm

    d = norm(loc=mu, scale=sd)
    xs = np.linspace(d.ppf(0.01), d.ppf(0.99), 100)
    cdf = interp1d(xs, d.cdf(xs), bounds_error=False, fill_value=(0, 1))
    lo, hi = mu - 3 * sd, mu + 3 * sd
    brk = [z for z in (v, *xs) if lo < z < hi]
    f = lambda y: (cdf(y) - (y > v)) ** 2  # noqa: E731
    return quad(f, lo, hi, points=brk, limit=400, epsabs=1e-13, epsrel=1e-12)[0]


def test_crps_curvas_matches_scipy_quad_of_the_interpolated_cdf():
    pytest.importorskip("scipy")
    cases = [(10, 12, 3), (5, 100, 20), (1000, 1003, 0.5), (7, 7, 2), (-50, 0, 10), (1e5, 9e4, 3e3), (3, 3, 0)]
    v, mu, sd = (torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in range(3))
    got = crps_curvas(v, mu, sd)
    for k, (a, b, c) in enumerate(cases):
        want = 0.0 if c == 0 else _curvas_quad(a, b, c)
        assert abs(float(got[k]) - want) <= 1e-8 * max(1.0, c), (cases[k], float(got[k]), want)
    # the documented differences from the closed form: truncation caps a far miss at 6 sigma
    far = crps_curvas(torch.tensor(1e6, dtype=torch.float64), 0.0, 1.0)
    assert float(far) <= 6.0 < float(crps_gaussian(torch.tensor(1e6, dtype=torch.float64), 0.0, 1.0))


def test_volume_crps_curvas_method_uses_the_same_volumes():
    x, t = _problem(B=2, C=3, S=(8, 8), R=3, seed=13)
    got = F.volume_crps(
        x, t, to_onehot_y=True, include_background=False, softmax=True, method="curvas", backend="reference"
    )
    p = torch.softmax(x.float(), 1).double().numpy()
    v, V = _np_volumes(p, t.numpy(), 3, np.ones(2))
    for b in range(2):
        for k, c in enumerate((1, 2)):
            want = _curvas_quad(v[b, c], V[b, c].mean(), V[b, c].std()) if V[b, c].std() > 0 else 0.0
            assert abs(float(got[b, k]) - want) <= 1e-6 * max(1.0, V[b, c].std())


# ----------------------------------------------------------------------------------- consensus / Dice
def test_consensus_masks_and_dice_match_numpy_loop():
    x, t = _problem(B=2, C=4, S=(9, 10), R=3, seed=17)
    t[:, 1:][torch.rand(t[:, 1:].shape, generator=torch.Generator().manual_seed(1)) < 0.6] = t[:, :1].expand(
        2, 2, 9, 10
    )[torch.rand(2, 2, 9, 10, generator=torch.Generator().manual_seed(1)) < 0.6]  # raters agree often
    masks = consensus_masks(t, 4)
    got = F.consensus_dice(x, t, to_onehot_y=True, include_background=False, softmax=True)
    lab = t.numpy()
    pred = x.argmax(1).numpy()
    for b in range(2):
        for c in range(4):
            hits = lab[b] == c
            fg, bg = hits.all(0), (~hits).all(0)
            assert np.array_equal(masks.foreground[b, c].numpy(), fg)
            assert np.array_equal(masks.background[b, c].numpy(), bg)
            assert np.array_equal(masks.dissensus[b, c].numpy(), ~(fg | bg))
            if c == 0:
                continue
            keep = fg | bg
            pr = (pred[b] == c) & keep
            want = 2 * (pr & fg).sum() / (pr.sum() + fg.sum()) if fg.sum() > 0 else np.nan
            np.testing.assert_allclose(float(got[b, c - 1]), want, rtol=1e-12, equal_nan=True)
    with pytest.raises(TypeError, match="integer"):
        consensus_masks(t.float(), 4)


# ------------------------------------------------------------------------------------ classification
def test_segmentation_api_rejects_classification_input_and_says_what_to_call():
    x = torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    for fn in (F.binned_stats, F.calibration_errors, F.marginal_l1_ace):
        with pytest.raises(ValueError, match="classification_calibration_errors"):
            fn(x, y, to_onehot_y=True, softmax=True)
    m = calibops.DatasetCalibration(3, to_onehot_y=True, softmax=True)
    with pytest.raises(ValueError, match="classification=True"):
        m.update(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_classification_errors_pooled_match_torchmetrics_and_numpy(backend):
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(21)
    B, C, M = 300, 5, 15
    p = torch.randint(1, 1024, (B, C), generator=g).float() / 1024
    y = torch.randint(0, C, (B,), generator=g)
    e = F.classification_calibration_errors(p, y, num_bins=M, mode="top_label", to_onehot_y=True, backend=backend)
    assert e.ece.shape == ()
    for norm, ours in (("l1", e.ece), ("l2", e.l2), ("max", e.mce)):
        ref = tm.MulticlassCalibrationError(num_classes=C, n_bins=M, norm=norm)(p, y)
        assert abs(float(ours) - float(ref)) <= 1e-6
    em = F.classification_calibration_errors(p, y, num_bins=M, mode="marginal", to_onehot_y=True, backend=backend)
    assert em.ece.shape == (C,)
    for c in range(C):
        want = _np_errors(p[:, c].numpy(), (y == c).numpy(), M)
        np.testing.assert_allclose([float(v[c]) for v in (*em, em.l2)], want, atol=1e-6, rtol=0)
    # one-hot targets give the same as labels
    oh = torch.nn.functional.one_hot(y, C).float()
    e2 = F.classification_calibration_errors(p, oh, num_bins=M, mode="top_label", backend=backend)
    assert float(e2.ece) == pytest.approx(float(e.ece), abs=1e-7)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        F.classification_calibration_errors(p, y[:-1], to_onehot_y=True)


def test_classification_loss_pools_the_batch():
    g = torch.Generator().manual_seed(22)
    B, C, M = 64, 4, 10
    x = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    for binning in ("hard", "soft"):
        loss = F.classification_marginal_l1_ace(
            x, y, num_bins=M, binning=binning, to_onehot_y=True, softmax=True, reduction="none", backend="reference"
        )  # float64 end to end (the kernel backends compute in float32), so the oracle can be held to 1e-12
        # independent: per class, the mean over non-empty bins of |mean p - mean y| over the *samples*
        p = torch.softmax(x, 1)
        if binning == "hard":
            bins = torch.tensor(_bins(p.detach().numpy().reshape(-1), M)).view(B, C)
            want = []
            for c in range(C):
                gaps = [
                    (p[bins[:, c] == j, c].mean() - (y[bins[:, c] == j] == c).double().mean()).abs()
                    for j in range(M)
                    if (bins[:, c] == j).any()
                ]
                want.append(torch.stack(gaps).mean())
            want = torch.stack(want)
            torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
            (g1,) = torch.autograd.grad(loss.sum(), x)
            (g2,) = torch.autograd.grad(want.sum(), x)
            torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
        else:  # soft: the pooled batch is the same as the per-image loss on one (1, C, B) "image"
            ref = F.marginal_l1_ace(
                x.t().unsqueeze(0),
                y.unsqueeze(0),
                num_bins=M,
                binning="soft",
                to_onehot_y=True,
                softmax=True,
                reduction="none",
                backend="reference",
            )[0]
            torch.testing.assert_close(loss, ref)
    mean = F.classification_marginal_l1_ace(x, y, num_bins=M, to_onehot_y=True, softmax=True)
    assert mean.dim() == 0


# ---------------------------------------------------------------------------------- adaptive binning
def test_adaptive_bins_from_fine_histogram_equal_sorted_equal_mass_bins():
    # N = 60 values in 60 distinct fine bins: equal-mass bins of 12 sorted values each are runs of fine bins
    g = torch.Generator().manual_seed(31)
    F_bins, M = 1000, 5
    fine_idx = torch.randperm(F_bins, generator=g)[:60].sort().values
    q = ((fine_idx.double() + 0.5) / F_bins).float()
    y = (torch.rand(60, generator=g) < q).float()
    s = F.binned_stats(q.view(1, 1, -1), y.view(1, 1, -1), num_bins=F_bins, backend="reference")
    errs, upper = adaptive_calibration_errors(pool_stats(s), M)
    qs, ys = q.double().numpy(), y.double().numpy()
    gaps = [abs(qs[k * 12 : (k + 1) * 12].mean() - ys[k * 12 : (k + 1) * 12].mean()) for k in range(M)]
    np.testing.assert_allclose(float(errs.ece[0]), np.mean(gaps), atol=1e-6)  # equal mass: ECE = ACE
    np.testing.assert_allclose(float(errs.ace[0]), np.mean(gaps), atol=1e-6)
    np.testing.assert_allclose(float(errs.mce[0]), np.max(gaps), atol=1e-6)
    assert upper[0].tolist() == [int(fine_idx[12 * k + 11]) for k in range(M)]


# ------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_is_seeded_and_matches_a_numpy_percentile_bootstrap():
    vals = torch.tensor([0.1, 0.4, float("nan"), 0.3, 0.2, 0.9, 0.05], dtype=torch.float64)
    a = bootstrap_ci(vals, num_samples=200, seed=3)
    b = bootstrap_ci(vals, num_samples=200, seed=3)
    c = bootstrap_ci(vals, num_samples=200, seed=4)
    assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
    assert not (torch.equal(a.lower, c.lower) and torch.equal(a.upper, c.upper))
    idx = torch.randint(0, 7, (200, 7), generator=torch.Generator().manual_seed(3)).numpy()
    draws = np.array([np.nanmean(vals.numpy()[i]) for i in idx])
    np.testing.assert_allclose([float(a.lower), float(a.upper)], np.nanpercentile(draws, [2.5, 97.5]), rtol=1e-12)
    assert float(a.estimate) == pytest.approx(np.nanmean(vals.numpy()))
    assert float(a.lower) <= float(a.estimate) <= float(a.upper)
