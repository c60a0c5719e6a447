"""DatasetCalibration's evaluation protocols: L2, classification, subgroups, adaptive bins, bootstrap.

Each dataset quantity is checked against an independent formulation: NumPy float64 loops over the voxels /
samples, torchmetrics on the pooled samples, or separate accumulators fed only one group's images. DDP for the
same quantities is in tests/test_distributed.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import calibops
import calibops.functional as F
from calibops import DatasetCalibration
from calibops.evaluation import adaptive_calibration_errors, pool_stats

from .test_eval_protocols import _bins, _np_errors

BACKENDS = [b for b in ("reference", "cpu", "triton") if calibops.available_backends()[b] is None]
# the background is left out explicitly (include_background defaults to True since v0.3); top-label has no
# class to leave out, so it takes the default
CFG = {"to_onehot_y": True, "softmax": True, "ignore_index": 255, "include_background": False}


def _cfg(mode: str) -> dict:
    return CFG if mode == "marginal" else {**CFG, "include_background": True}


def _batches(seed=0, C=4, n=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        S = ((6, 7), (5, 5), (8, 3), (4, 9))[k % 4]
        B = 1 + k % 2
        x = 2 * torch.randn(B, C, *S, generator=g)
        y = torch.randint(0, C, (B, *S), generator=g)
        y[torch.rand(y.shape, generator=g) < 0.1] = 255
        out.append((x, y))
    return out


# ------------------------------------------------------------------------------------------------ L2
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_dataset_l2_macro_and_micro_match_numpy(backend, mode):
    C, M = 4, 10
    m = DatasetCalibration(C, num_bins=M, mode=mode, backend=backend, **_cfg(mode))
    per_image, pooled_q, pooled_y = [], {}, {}
    rows = [0] if mode == "top_label" else [1, 2, 3]
    for x, y in _batches():
        m.update(x, y)
        p = torch.softmax(x.float(), 1).flatten(2).numpy()
        lab = y.flatten(1).numpy()
        for b in range(x.shape[0]):
            used = lab[b] != 255
            vals = []
            for c in rows:
                if mode == "top_label":
                    q, t = p[b].max(0)[used], (p[b].argmax(0) == lab[b])[used]
                else:
                    q, t = p[b, c][used], (lab[b] == c)[used]
                vals.append(_np_errors(q, t, M)[3])
                pooled_q.setdefault(c, []).append(q)
                pooled_y.setdefault(c, []).append(t)
            per_image.append(vals)
    res = m.compute()
    macro = np.nanmean(np.array(per_image), 0)
    micro = [_np_errors(np.concatenate(pooled_q[c]), np.concatenate(pooled_y[c]), M)[3] for c in rows]
    got_macro = res.macro.l2.double().reshape(-1).numpy()
    got_micro = res.micro.l2.double().reshape(-1).numpy()
    np.testing.assert_allclose(got_macro, macro, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_micro, micro, atol=1e-6, rtol=0)
    ece, ace, mce = res.micro  # three-field unpacking still works
    assert ece.shape == res.micro.l2.shape


def test_checkpoint_without_l2_loads_with_macro_l2_unknown():
    m = DatasetCalibration(4, num_bins=8, **CFG)
    for x, y in _batches():
        m.update(x, y)
    sd = m.state_dict()
    del sd["macro_l2"]  # written before the L2 error existed
    m2 = DatasetCalibration(4, num_bins=8, **CFG)
    m2.load_state_dict(sd)
    r, r2 = m.compute(), m2.compute()
    assert torch.isnan(r2.macro.l2).all() and torch.equal(r2.micro.l2, r.micro.l2)
    for u, v in zip((*r.macro, *r.micro), (*r2.macro, *r2.micro), strict=True):
        assert torch.equal(u, v)
    m2.load_state_dict(m2.state_dict())  # the unknown value round-trips
    bad = m.state_dict()
    bad["macro_l2"][0] = 99.0
    with pytest.raises(ValueError, match="macro_l2"):
        m2.load_state_dict(bad)


# ------------------------------------------------------------------------------------ classification
@pytest.mark.parametrize("backend", BACKENDS)
def test_classification_pools_samples_over_the_dataset(backend):
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(4)
    C, M = 5, 15
    xs = [torch.randint(1, 1024, (n, C), generator=g).float() / 1024 for n in (7, 40, 1, 23)]
    ys = [torch.randint(0, C, (x.shape[0],), generator=g) for x in xs]
    top = DatasetCalibration(C, num_bins=M, to_onehot_y=True, mode="top_label", classification=True, backend=backend)
    marg = DatasetCalibration(C, num_bins=M, include_background=True, classification=True, backend=backend)
    for x, y in zip(xs, ys, strict=True):
        top.update(x, y)
        marg.update(x, torch.nn.functional.one_hot(y, C).float())  # (B, C) one-hot targets as well
    X, Y = torch.cat(xs), torch.cat(ys)
    r = top.compute()
    assert r.num_images == X.shape[0] and r.micro.ece.shape == () and math.isnan(float(r.macro.ece))
    for norm, ours in (("l1", r.micro.ece), ("l2", r.micro.l2), ("max", r.micro.mce)):
        ref = tm.MulticlassCalibrationError(num_classes=C, n_bins=M, norm=norm)(X, Y)
        assert abs(float(ours) - float(ref)) <= 1e-6
    rm = marg.compute()
    for c in range(C):
        want = _np_errors(X[:, c].numpy(), (Y == c).numpy(), M)
        np.testing.assert_allclose([float(v[c]) for v in (*rm.micro, rm.micro.l2)], want, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="plot"):
        top.histogram()
    pytest.importorskip("matplotlib")
    assert len(marg.plot().axes) == C
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        top.update(torch.rand(3, C, 2), Y[:3])
    with pytest.raises(ValueError, match="records"):
        DatasetCalibration(C, classification=True, keep_records=True)


def test_classification_groups_pool_each_groups_samples():
    g = torch.Generator().manual_seed(5)
    C, M = 3, 8
    m = DatasetCalibration(
        C, num_bins=M, to_onehot_y=True, softmax=True, classification=True, include_background=True, groups=("a", "b")
    )
    xs, ys, gs = [], [], []
    for n in (9, 14, 6):
        x = torch.randn(n, C, generator=g)
        y = torch.randint(0, C, (n,), generator=g)
        grp = ["a" if v < 0.4 else "b" for v in torch.rand(n, generator=g).tolist()]
        m.update(x, y, groups=grp)
        xs.append(x)
        ys.append(y)
        gs += grp
    X, Y = torch.cat(xs), torch.cat(ys)
    res = m.compute_groups()
    for name in ("a", "b"):
        sel = torch.tensor([v == name for v in gs])
        want = F.classification_calibration_errors(
            X[sel], Y[sel], num_bins=M, mode="marginal", to_onehot_y=True, softmax=True
        )
        torch.testing.assert_close(res[name].micro.ece, want.ece, atol=1e-6, rtol=0)
        assert res[name].num_images == int(sel.sum())


# ----------------------------------------------------------------------------------------- subgroups
@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_equal_separate_accumulators_per_group(backend):
    names = ("site A", "site B", "site C")
    m = DatasetCalibration(4, num_bins=9, groups=names, keep_records=True, backend=backend, **CFG)
    sep = {n: DatasetCalibration(4, num_bins=9, backend=backend, **CFG) for n in names}
    whole = DatasetCalibration(4, num_bins=9, backend=backend, **CFG)
    k = 0
    for x, y in _batches(n=6):
        grp = [names[(k + b) % 2] for b in range(x.shape[0])]  # site C never appears
        k += x.shape[0]
        m.update(x, y, groups=grp)
        whole.update(x, y)
        for b, name in enumerate(grp):
            sep[name].update(x[b : b + 1], y[b : b + 1])
    res = m.compute_groups()
    for name in names:
        want = sep[name].compute()
        got = res[name]
        assert got.num_images == want.num_images
        for u, v in zip(
            (*got.macro, got.macro.l2, *got.micro, got.micro.l2),
            (*want.macro, want.macro.l2, *want.micro, want.micro.l2),
            strict=True,
        ):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=0, equal_nan=True)
        assert torch.equal(got.images_per_class, want.images_per_class)
    # the overall result is unchanged by the groups
    for u, v in zip(m.compute().micro, whole.compute().micro, strict=True):
        assert torch.equal(u, v)
    assert torch.equal(m.histogram(), whole.histogram())
    # gaps: highest - lowest over the groups that have a value (site C has none)
    gaps = m.group_gaps()
    a, b = res["site A"].macro.ece.double(), res["site B"].macro.ece.double()
    torch.testing.assert_close(gaps["ece"].gap, (a - b).abs())
    assert gaps["ece"].highest == ["site A" if u > v else "site B" for u, v in zip(a.tolist(), b.tolist())]
    assert set(gaps) == {"ece", "ace", "mce", "l2"}
    # records carry the group
    assert {r["group"] for r in m.records()} == {"site A", "site B"}


def test_group_errors_and_bootstrap():
    names = ("f", "m")
    m = DatasetCalibration(3, num_bins=6, groups=names, keep_records=True, **CFG)
    g = torch.Generator().manual_seed(8)
    for i in range(6):
        x, y = 2 * torch.randn(2, 3, 5, 4, generator=g), torch.randint(0, 3, (2, 5, 4), generator=g)
        m.update(x, y, groups=[names[i % 2], names[(i // 2) % 2]])
    with pytest.raises(ValueError, match="groups"):
        m.update(x, y)
    with pytest.raises(ValueError, match="not in"):
        m.update(x, y, groups=["f", "x"])
    with pytest.raises(ValueError, match="one group name per image"):
        m.update(x, y, groups=["f"])
    with pytest.raises(ValueError, match="without groups"):
        DatasetCalibration(3, **CFG).update(x, y, groups=["f", "m"])
    a = m.bootstrap("ece", num_samples=300, seed=1)
    b = m.bootstrap("ece", num_samples=300, seed=1)
    assert torch.equal(a["gap"].lower, b["gap"].lower) and torch.equal(a["groups"]["f"].upper, b["groups"]["f"].upper)
    # the estimate is the macro value; the interval brackets it
    res = m.compute()
    torch.testing.assert_close(a["all"].estimate.float(), res.macro.ece, atol=1e-6, rtol=0)
    assert bool(
        (a["all"].lower <= a["all"].estimate + 1e-12).all() and (a["all"].estimate <= a["all"].upper + 1e-12).all()
    )
    gres = m.compute_groups()
    torch.testing.assert_close(a["groups"]["m"].estimate.float(), gres["m"].macro.ece, atol=1e-6, rtol=0)
    torch.testing.assert_close(a["gap"].estimate.float(), m.group_gaps()["ece"].gap.float(), atol=1e-6, rtol=0)
    # the gap interval by hand: stratified resampling with the documented generator
    recs = m.records()
    per = {n: [] for n in names}
    for i in range(0, len(recs), 2):
        per[recs[i]["group"]].append([recs[i]["ece"], recs[i + 1]["ece"]])
    vals = {n: np.array(v) for n, v in per.items()}
    gen = torch.Generator().manual_seed(1)
    idx = {n: torch.randint(0, len(vals[n]), (300, len(vals[n])), generator=gen).numpy() for n in names}
    draws = []
    for s in range(300):
        means = [np.nanmean(vals[n][idx[n][s]], 0) for n in names]
        draws.append(np.max(means, 0) - np.min(means, 0))
    np.testing.assert_allclose(a["gap"].lower.numpy(), np.nanpercentile(draws, 2.5, axis=0), rtol=1e-10)
    with pytest.raises(RuntimeError, match="keep_records"):
        DatasetCalibration(3, **CFG).bootstrap()
    pytest.importorskip("matplotlib")
    fig = m.plot_groups(class_index=1)
    assert sum(ax.get_visible() for ax in fig.axes) == 2


def test_groups_state_dict_round_trip_and_checks():
    names = ("x", "y")
    m = DatasetCalibration(3, num_bins=6, groups=names, adaptive_bins=4, fine_bins=50, **CFG)
    g = torch.Generator().manual_seed(9)
    x, y = 2 * torch.randn(3, 3, 5, 4, generator=g), torch.randint(0, 3, (3, 5, 4), generator=g)
    m.update(x, y, groups=["x", "y", "y"])
    m2 = DatasetCalibration(3, num_bins=6, groups=names, adaptive_bins=4, fine_bins=50, **CFG)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.compute_groups()["y"].micro.ece, m.compute_groups()["y"].micro.ece)
    assert torch.equal(m2.adaptive_errors().ece, m.adaptive_errors().ece)
    with pytest.raises(ValueError, match="config"):
        DatasetCalibration(3, num_bins=6, groups=("x", "z"), adaptive_bins=4, fine_bins=50, **CFG).load_state_dict(
            m.state_dict()
        )
    sd = m.state_dict()
    sd["group_images"][0] += 1
    with pytest.raises(ValueError, match="group_images"):
        m2.load_state_dict(sd)
    sd = m.state_dict()
    sd["fine_sum_p"] += 1e3
    with pytest.raises(ValueError, match="fine_sum_p"):
        m2.load_state_dict(sd)


# ---------------------------------------------------------------------------------- adaptive binning
@pytest.mark.parametrize("backend", BACKENDS)
def test_adaptive_errors_from_the_fine_histogram(backend):
    m = DatasetCalibration(4, num_bins=10, adaptive_bins=5, fine_bins=200, backend=backend, **CFG)
    data = _batches(n=5)
    for x, y in data:
        m.update(x, y)
    # independent: the fine statistics of every image by the functional API, pooled, then regrouped
    fine = [F.binned_stats(x, y, num_bins=200, backend=backend, **CFG) for x, y in data]
    pooled = pool_stats(F.BinnedStats(*(torch.cat([getattr(s, k) for s in fine]) for k in ("count", "sum_p", "sum_y"))))
    want, _ = adaptive_calibration_errors(pooled, 5)
    got = m.adaptive_errors()
    for u, v in zip((*got, got.l2), (*want, want.l2), strict=True):
        torch.testing.assert_close(u.double(), v.double(), atol=1e-6, rtol=0)
    # equal mass: every adaptive bin of a class holds about N/5 voxels (within one fine bin's mass)
    n = pooled.count
    errs, upper = adaptive_calibration_errors(pooled, 5)
    for c in range(3):
        edges = [-1] + upper[c].tolist()
        masses = [float(n[c, edges[k] + 1 : edges[k + 1] + 1].sum()) for k in range(5)]
        assert max(abs(v - float(n[c].sum()) / 5) for v in masses) <= float(n[c].max()) + 1e-9
    with pytest.raises(RuntimeError, match="adaptive_bins"):
        DatasetCalibration(4, **CFG).adaptive_errors()
    with pytest.raises(ValueError, match="fine_bins"):
        DatasetCalibration(4, adaptive_bins=10, fine_bins=5)


def test_adaptive_errors_equal_sorted_equal_mass_bins_at_fine_granularity():
    # 40 samples in 40 distinct fine bins: equal-mass bins of 8 sorted samples are runs of fine bins
    g = torch.Generator().manual_seed(12)
    idx = torch.randperm(500, generator=g)[:40]
    q = ((idx.double() + 0.5) / 500).float()
    y = (torch.rand(40, generator=g) < q).long()
    m = DatasetCalibration(
        2, include_background=True, to_onehot_y=True, classification=True, adaptive_bins=5, fine_bins=500
    )
    m.update(torch.stack([1 - q, q], 1), y)
    got = m.adaptive_errors()
    order = np.argsort(q.numpy())
    qs, ys = q.double().numpy()[order], y.double().numpy()[order]
    gaps = [abs(qs[8 * k : 8 * k + 8].mean() - ys[8 * k : 8 * k + 8].mean()) for k in range(5)]
    np.testing.assert_allclose(float(got.ece[1]), np.mean(gaps), atol=1e-6)
    np.testing.assert_allclose(float(got.mce[1]), np.max(gaps), atol=1e-6)
    assert _bins(q.numpy(), 500).tolist() == idx.tolist()  # the premise: one sample per fine bin


# --------------------------------------------------------------------------------------------- raters
@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_rater_dataset_macro_is_curvas_mean_and_micro_is_soft_label(backend):
    C, M, R = 4, 12, 3
    g = torch.Generator().manual_seed(41)
    m = DatasetCalibration(C, num_bins=M, multi_rater=True, keep_records=True, backend=backend, **CFG)
    per_image, q_all, y_all = [], {c: [] for c in (1, 2, 3)}, {c: [] for c in (1, 2, 3)}
    spacing = (0.5, 2.0)
    for S in ((6, 7), (9, 4)):
        x = 2 * torch.randn(2, C, *S, generator=g)
        t = torch.randint(0, C, (2, R, *S), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.05] = 255
        m.update(x, t, spacing=spacing)
        p = torch.softmax(x.float(), 1).flatten(2).numpy()
        lab = t.flatten(2).numpy()
        for b in range(2):
            used = np.all(lab[b] != 255, 0)
            row = []
            for c in (1, 2, 3):
                row.append(np.mean([_np_errors(p[b, c][used], (lab[b, r] == c)[used], M)[0] for r in range(R)]))
                q_all[c].append(p[b, c][used])
                y_all[c].append(np.mean([(lab[b, r] == c)[used] for r in range(R)], 0))
            per_image.append(row)
    res = m.compute()
    np.testing.assert_allclose(res.macro.ece.double().numpy(), np.mean(per_image, 0), atol=1e-6, rtol=0)
    soft = [_np_errors(np.concatenate(q_all[c]), np.concatenate(y_all[c]), M)[0] for c in (1, 2, 3)]
    np.testing.assert_allclose(res.micro.ece.double().numpy(), soft, atol=1e-6, rtol=0)
    # records: the per-image CURVAS values next to the volume CRPS and consensus Dice of the functional API
    recs = m.records()
    assert [r["ece"] for r in recs[:3]] == pytest.approx(per_image[0], abs=1e-6)
    g2 = torch.Generator().manual_seed(41)
    x = 2 * torch.randn(2, C, 6, 7, generator=g2)
    t = torch.randint(0, C, (2, R, 6, 7), generator=g2)
    t[torch.rand(t.shape, generator=g2) < 0.05] = 255
    used = (t != 255).all(1, keepdim=True).expand_as(t)
    kw = {"to_onehot_y": True, "include_background": False, "softmax": True}  # rater label maps, classes 1..3
    crps = F.volume_crps(x, torch.where(used, t, torch.full_like(t, 99)), spacing=spacing, validate=False, **kw)
    assert [r["volume_crps"] for r in recs[:3]] == pytest.approx(crps[0].tolist(), rel=1e-6)
    dice = F.consensus_dice(x, t, ignore_index=255, **kw)
    assert [r["consensus_dice"] for r in recs[:3]] == pytest.approx(dice[0].tolist(), nan_ok=True)
    with pytest.raises(ValueError, match="consensus_dice"):
        DatasetCalibration(C, multi_rater=True, keep_records=True, dice=True, **CFG)
    with pytest.raises(ValueError, match="to_onehot_y"):
        DatasetCalibration(C, multi_rater=True)


def test_multi_rater_top_label_and_classification_nonfinite_skip():
    g = torch.Generator().manual_seed(43)
    x = 2 * torch.randn(3, 4, 5, 6, generator=g)
    t = torch.randint(0, 4, (3, 2, 5, 6), generator=g)
    m = DatasetCalibration(4, num_bins=10, multi_rater=True, mode="top_label", to_onehot_y=True, softmax=True)
    m.update(x, t)
    per = F.calibration_errors(x, t, num_bins=10, to_onehot_y=True, softmax=True, mode="top_label", multi_rater=True)
    torch.testing.assert_close(m.compute().macro.ece, per.ece.double().mean(1).mean().float(), atol=1e-6, rtol=0)
    # classification: a NaN logit row is left out and counted with nonfinite="skip", raises with "raise"
    xs = torch.randn(10, 3, generator=g)
    xs[4, 1] = float("nan")
    ys = torch.randint(0, 3, (10,), generator=g)
    skip = DatasetCalibration(
        3, to_onehot_y=True, softmax=True, classification=True, include_background=True, nonfinite="skip"
    )
    with pytest.warns(RuntimeWarning, match="non-finite"):
        skip.update(xs, ys)
    keep = torch.arange(10) != 4
    want = F.classification_calibration_errors(
        xs[keep], ys[keep], num_bins=20, mode="marginal", to_onehot_y=True, softmax=True
    )
    torch.testing.assert_close(skip.compute().micro.ece, want.ece, atol=1e-6, rtol=0)
    assert skip.compute().nonfinite == 3
    with pytest.raises(ValueError, match="non-finite"):
        DatasetCalibration(3, to_onehot_y=True, softmax=True, classification=True).update(xs, ys)


def test_group_rows_and_csv(tmp_path):
    import csv

    m = DatasetCalibration(3, num_bins=6, groups=("a", "b"), **CFG)
    g = torch.Generator().manual_seed(44)
    for grp in (["a", "b"], ["b", "b"]):
        m.update(2 * torch.randn(2, 3, 5, 4, generator=g), torch.randint(0, 3, (2, 5, 4), generator=g), groups=grp)
    rows = m.group_rows()
    res, gaps = m.compute_groups(), m.group_gaps("micro")
    assert [(r["group"], r["class"]) for r in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("gap", 1), ("gap", 2)]
    assert rows[2]["images"] == 3 and rows[3]["micro_l2"] == pytest.approx(float(res["b"].micro.l2[1]))
    assert rows[5]["micro_ece"] == pytest.approx(float(gaps["ece"].gap[1]))
    m.write_groups_csv(tmp_path / "groups.csv")
    with open(tmp_path / "groups.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == 6 and float(back[0]["macro_ece"]) == pytest.approx(rows[0]["macro_ece"])


# ---------------------------------------------------------------------------------------------- Brier
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["marginal", "top_label"])
def test_dataset_brier_macro_micro_and_decomposition_match_numpy(backend, mode):
    C, M = 4, 8
    m = DatasetCalibration(C, num_bins=M, mode=mode, brier=True, backend=backend, **_cfg(mode))
    rows = [0] if mode == "top_label" else [1, 2, 3]
    per_image, qs, ys = [], {c: [] for c in rows}, {c: [] for c in rows}
    for x, y in _batches(seed=7):
        m.update(x, y)
        p = torch.softmax(x.float(), 1).flatten(2).double().numpy()
        lab = y.flatten(1).numpy()
        for b in range(x.shape[0]):
            used = lab[b] != 255
            row = []
            for c in rows:
                if mode == "top_label":
                    q, t = p[b].max(0)[used], (p[b].argmax(0) == lab[b])[used].astype(float)
                else:
                    q, t = p[b, c][used], (lab[b] == c)[used].astype(float)
                row.append(np.mean((q - t) ** 2))
                qs[c].append(q)
                ys[c].append(t)
            per_image.append(row)
    macro, micro = m.brier()
    np.testing.assert_allclose(macro.reshape(-1).numpy(), np.mean(per_image, 0), atol=1e-6, rtol=0)
    Q = {c: np.concatenate(qs[c]) for c in rows}
    Y = {c: np.concatenate(ys[c]) for c in rows}
    np.testing.assert_allclose(micro.reshape(-1).numpy(), [np.mean((Q[c] - Y[c]) ** 2) for c in rows], atol=1e-6)
    d = m.brier_decomposition()
    for k, c in enumerate(rows):
        bins = _bins(Q[c], M)
        o = Y[c].mean()
        rel = sum((bins == j).sum() * (Q[c][bins == j].mean() - Y[c][bins == j].mean()) ** 2 for j in set(bins))
        res = sum((bins == j).sum() * (Y[c][bins == j].mean() - o) ** 2 for j in set(bins))
        got = [float(v.reshape(-1)[k]) for v in (d.reliability, d.resolution, d.uncertainty)]
        np.testing.assert_allclose(got, [rel / len(Q[c]), res / len(Q[c]), o * (1 - o)], atol=2e-6, rtol=0)
    with pytest.raises(RuntimeError, match="brier=True"):
        DatasetCalibration(C, **CFG).brier()
    with pytest.raises(ValueError, match="to_onehot_y"):
        DatasetCalibration(C, brier=True)


def test_classification_brier_pools_samples():
    g = torch.Generator().manual_seed(45)
    x, y = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    m = DatasetCalibration(3, to_onehot_y=True, softmax=True, classification=True, include_background=True, brier=True)
    m.update(x[:20], y[:20])
    m.update(x[20:], y[20:])
    _, micro = m.brier()
    p = torch.softmax(x.double(), 1)
    want = ((p - torch.nn.functional.one_hot(y, 3).double()) ** 2).mean(0)
    torch.testing.assert_close(micro, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="class indices"):
        m.update(x, torch.nn.functional.one_hot(y, 3).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_protocols_on_cuda_inputs_match_cpu():
    g = torch.Generator().manual_seed(50)
    x = 2 * torch.randn(2, 4, 6, 5, generator=g)
    t = torch.randint(0, 4, (2, 3, 6, 5), generator=g)
    kw = {"backend": "reference"}
    for fn in (
        lambda a, b: F.volume_crps(a, b, to_onehot_y=True, softmax=True, spacing=(0.5, 2.0), **kw),
        lambda a, b: F.volume_crps(a, b, to_onehot_y=True, softmax=True, method="curvas", **kw),
        lambda a, b: F.brier_score(a, b, to_onehot_y=True, softmax=True, multi_rater=True, **kw),
        lambda a, b: F.consensus_dice(a, b, to_onehot_y=True, softmax=True),
    ):
        torch.testing.assert_close(fn(x.cuda(), t.cuda()).cpu(), fn(x, t), atol=1e-5, rtol=1e-5, equal_nan=True)
    opts = {"to_onehot_y": True, "softmax": True, "backend": "reference", "multi_rater": True, "brier": True}
    extra = {"groups": ("a", "b"), "adaptive_bins": 4, "fine_bins": 40, "keep_records": True}
    cpu, gpu = DatasetCalibration(4, **opts, **extra), DatasetCalibration(4, **opts, **extra)
    cpu.update(x, t, groups=["a", "b"])
    gpu.update(x.cuda(), t.cuda(), groups=["a", "b"])
    for u, v in zip(
        (*cpu.compute().macro, *cpu.adaptive_errors(), *cpu.brier()),
        (*gpu.compute().macro, *gpu.adaptive_errors(), *gpu.brier()),
        strict=True,
    ):
        torch.testing.assert_close(v.cpu(), u, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(gpu.group_gaps()["ece"].gap.cpu(), cpu.group_gaps()["ece"].gap, atol=1e-5, rtol=0)
