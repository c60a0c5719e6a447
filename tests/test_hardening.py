"""Hardening of the evaluation layer (issue 24): exact counts, left-out voxels, argument checks, bootstrap limits.

Every test here failed on v0.2 (commit bb71170) and states the wrong behaviour it guards against.
"""

from __future__ import annotations

import csv
import json
import os
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


# ------------------------------------------------------------------ calibops evaluate
def _cli_set(root, n=4, C=3, seed=0):
    """n NumPy cases (C, 6, 5, 4) probabilities and labels in root/pred, root/label."""
    rng = np.random.default_rng(seed)
    (root / "pred").mkdir()
    (root / "label").mkdir()
    for i in range(n):
        z = rng.normal(size=(C, 6, 5, 4))
        np.save(root / "pred" / f"case{i:02d}.npy", (np.exp(z) / np.exp(z).sum(0)).astype(np.float32))
        np.save(root / "label" / f"case{i:02d}.npy", rng.integers(0, C, (6, 5, 4)).astype(np.int16))
    return root / "pred", root / "label"


def _cli(pred, label, out, *extra):
    from calibops.cli.evaluate import evaluate_main

    return evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress", *extra])


def _one_line_error(capsys, rc, got, *match):
    cap = capsys.readouterr()
    assert got == rc, cap.err
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibops evaluate: error: "), cap.err
    assert "Traceback" not in cap.err + cap.out
    for m in match:
        assert m in lines[0], lines[0]
    return lines[0]


def _no_temporaries(folder):
    assert not [p for p in os.listdir(folder) if ".calibops-" in p]


def test_cli_groups_csv_duplicated_group_column_is_an_error(tmp_path, capsys):
    pred, label = _cli_set(tmp_path)
    g = tmp_path / "g.csv"
    g.write_text("case,group,group\ncase00,a,x\ncase01,a,x\ncase02,b,y\ncase03,b,y\n")
    got = _cli(pred, label, tmp_path / "out", "--groups", str(g), "--no-figures")
    _one_line_error(capsys, 1, got, "'group' 2 times", str(g))
    assert not (tmp_path / "out").exists()


def test_cli_groups_csv_saved_by_excel_with_a_bom_reads(tmp_path, capsys):
    pred, label = _cli_set(tmp_path)
    g = tmp_path / "g.csv"
    g.write_bytes("case,group\r\ncase00,a\r\ncase01,a\r\ncase02,b\r\ncase03,b\r\n".encode("utf-8-sig"))
    assert _cli(pred, label, tmp_path / "out", "--groups", str(g), "--no-figures") == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "groups.csv", newline="") as f:
        assert [r["group"] for r in csv.DictReader(f)][:2] == ["a", "a"]


@pytest.mark.parametrize("name", ["all", "gap"])
def test_cli_group_names_of_report_rows_are_refused(tmp_path, capsys, name):
    pred, label = _cli_set(tmp_path)
    g = tmp_path / "g.csv"
    g.write_text(f"case,group\ncase00,{name}\ncase01,a\ncase02,a\ncase03,a\n")
    _one_line_error(capsys, 1, _cli(pred, label, tmp_path / "out", "--groups", str(g)), "reserved", repr(name))


def test_cli_bootstrap_intervals_carry_their_images_and_warn_for_small_groups(tmp_path, capsys):
    pred, label = _cli_set(tmp_path, n=4)
    g = tmp_path / "g.csv"
    g.write_text("case,group\ncase00,solo\ncase01,trio\ncase02,trio\ncase03,trio\n")
    out = tmp_path / "out"
    assert _cli(pred, label, out, "--groups", str(g), "--no-figures", "--bootstrap-samples", "50") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("calibops evaluate: warning: ") for e in err), err
    assert "group 'solo'" in err[0] and "zero-width" in err[0] and "fewer than 10" in err[0]
    assert "group 'trio'" in err[1] and "from 3 image(s)" in err[1]
    assert "group 'all'" in err[2] and "from 4 image(s)" in err[2]
    with open(out / "groups.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["group"], r["class"]): int(r["bootstrap_images"]) for r in rows}
    assert {got[("solo", c)] for c in "12"} == {1}
    assert {got[("trio", c)] for c in "12"} == {3}
    assert {got[("all", c)] for c in "12"} == {4}
    assert {got[("gap", c)] for c in "12"} == {1}  # the smallest group
    solo = [r for r in rows if r["group"] == "solo"]
    assert all(r["macro_ece_lower"] == r["macro_ece_upper"] for r in solo)  # the zero-width interval, warned
    report = json.loads((out / "summary.json").read_text())
    assert all("bootstrap_images" in r for r in report["groups"])


def test_cli_bootstrap_samples_and_seed_limits(tmp_path, capsys):
    pred, label = _cli_set(tmp_path, n=2)
    out = tmp_path / "out"
    _one_line_error(capsys, 2, _cli(pred, label, out, "--bootstrap-samples", "100001"), "--bootstrap-samples", "100000")
    _one_line_error(capsys, 2, _cli(pred, label, out, "--seed", str(2**64)), "--seed", "2**63 - 1")
    _one_line_error(capsys, 2, _cli(pred, label, out, "--seed", "-1"), "--seed")
    assert not out.exists()


def test_cli_num_bins_bounded_by_the_histogram_memory(tmp_path, capsys, monkeypatch):
    import calibops.io

    pred, label = _cli_set(tmp_path, n=2)
    out = tmp_path / "out"
    real = calibops.io.load_probabilities
    read = []
    monkeypatch.setattr(calibops.io, "load_probabilities", lambda *a, **k: read.append(a) or real(*a, **k))
    # hopeless for any class count: refused before any case is read
    line = _one_line_error(capsys, 2, _cli(pred, label, out, "--num-bins", "100000"), "--num-bins 100000", "GiB")
    assert "74.51 GiB" in line and "--num-bins 11585 or fewer" in line and not read
    # one class would fit, the two classes used do not: refused once the classes are known, before the metric
    line = _one_line_error(capsys, 2, _cli(pred, label, out, "--num-bins", "9000"), "2 class(es)", "1.21 GiB")
    assert "--num-bins 8192 or fewer" in line and len(read) == 1  # the first case told the classes
    # with --num-classes (and groups) the real need is known before any case is read
    g = tmp_path / "g.csv"
    g.write_text("case,group\ncase00,a\ncase01,b\n")
    extra = ["--num-bins", "5000", "--num-classes", "3", "--groups", str(g)]
    line = _one_line_error(capsys, 2, _cli(pred, label, out, *extra), "2 class(es) and 2 group(s)", "1.12 GiB")
    assert len(read) == 1 and not out.exists()


def test_cli_out_inside_an_input_folder_is_refused_before_any_case(tmp_path, capsys, monkeypatch):
    import calibops.io

    pred, label = _cli_set(tmp_path, n=2)
    monkeypatch.setattr(calibops.io, "load_probabilities", lambda *a, **k: pytest.fail("a case was read"))
    before = sorted(os.listdir(pred))
    _one_line_error(capsys, 2, _cli(pred, label, pred / "results"), "inside --pred", "next run")
    _one_line_error(capsys, 2, _cli(pred, label, pred), "inside --pred")
    _one_line_error(capsys, 2, _cli(pred, label, label / "x" / "y"), "inside --label")
    _one_line_error(capsys, 2, _cli(pred, label, tmp_path), "holds --pred")
    assert sorted(os.listdir(pred)) == before


def test_cli_out_holding_foreign_files_or_read_only_is_refused_before_any_case(tmp_path, capsys, monkeypatch):
    import calibops.cli.outputs
    import calibops.io

    pred, label = _cli_set(tmp_path, n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(calibops.io, "load_probabilities", lambda *a, **k: pytest.fail("a case was read"))
    _one_line_error(capsys, 2, _cli(pred, label, out), "'notes.txt'", "did not write")
    assert os.listdir(out) == ["notes.txt"]
    os.remove(out / "notes.txt")
    real_access = os.access
    monkeypatch.setattr(
        calibops.cli.outputs.os, "access", lambda p, m: False if os.fspath(p) == str(out) else real_access(p, m)
    )
    _one_line_error(capsys, 1, _cli(pred, label, out), "writable", str(out))


def test_cli_rerun_into_the_same_out_leaves_no_stale_file(tmp_path, capsys):
    pred, label = _cli_set(tmp_path)
    g = tmp_path / "g.csv"
    g.write_text("case,group\ncase00,a\ncase01,a\ncase02,b\ncase03,b\n")
    out = tmp_path / "out"
    assert _cli(pred, label, out, "--groups", str(g), "--no-figures", "--bootstrap-samples", "20") == 0
    assert "groups.csv" in os.listdir(out)
    assert _cli(pred, label, out, "--no-figures", "--num-bins", "7") == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["dataset_histogram.npz", "per_image.csv", "summary.csv", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["num_bins"] == 7
    _no_temporaries(tmp_path)


def test_cli_failure_or_ctrl_c_while_writing_leaves_the_previous_outputs(tmp_path, capsys, monkeypatch):
    pred, label = _cli_set(tmp_path)
    out = tmp_path / "out"
    assert _cli(pred, label, out, "--no-figures") == 0
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    capsys.readouterr()
    for exc, rc in [(OSError(28, "No space left on device"), 1), (KeyboardInterrupt(), 130)]:

        def broken(*a, exc=exc, **k):
            raise exc

        with monkeypatch.context() as m:
            m.setattr(np, "savez", broken)  # the last file written: the others are already in the temporary dir
            try:
                got = _cli(pred, label, out, "--no-figures", "--num-bins", "5")
            except KeyboardInterrupt:
                pytest.fail("Ctrl-C escaped as a traceback")
        line = _one_line_error(capsys, rc, got)
        assert ("No space left" in line) if rc == 1 else ("interrupted" in line)
        assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before  # untouched: no partial result
        _no_temporaries(tmp_path)


def test_cli_ctrl_c_while_reading_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    import calibops.io

    pred, label = _cli_set(tmp_path, n=2)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibops.io, "load_probabilities", interrupted)
    try:
        got = _cli(pred, label, tmp_path / "out")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback")
    assert "Ctrl-C" in _one_line_error(capsys, 130, got)
    assert not (tmp_path / "out").exists()


def test_cli_dangling_symlink_is_reported_as_such(tmp_path, capsys):
    pred, label = _cli_set(tmp_path, n=2)
    os.remove(pred / "case01.npy")
    os.symlink(tmp_path / "gone" / "case01.npy", pred / "case01.npy")
    line = _one_line_error(capsys, 1, _cli(pred, label, tmp_path / "out"), str(pred / "case01.npy"), "dangling")
    assert "without a prediction" not in line
