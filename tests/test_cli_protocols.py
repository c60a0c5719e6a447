"""``calibops evaluate`` with the evaluation protocols of issue 11: several rater folders, ``--groups``,
``--mode top_label`` and the JSON summary.

Every number written is compared with the library calls (``DatasetCalibration``, ``functional.volume_crps``,
``functional.consensus_dice``) on the same arrays; every error path must be one line, the CLI's exit status, and
leave no output file.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from calibops import functional as F
from calibops.cli.evaluate import evaluate_main
from calibops.metrics import DatasetCalibration

nib = pytest.importorskip("nibabel")

C = 3
SIZES = [(7, 6, 5), (6, 5, 4), (5, 7, 3), (6, 6, 4)]  # no symmetric shape: the axis order is read off the shape
SPACING = (0.5, 1.25, 2.0)


def _data(seed=0, raters=3, sizes=SIZES):
    rng = np.random.default_rng(seed)
    out = []
    for i, sp in enumerate(sizes):
        z = 2 * rng.normal(size=(C, *sp))
        p = (np.exp(z) / np.exp(z).sum(0, keepdims=True)).astype(np.float32)
        base = rng.integers(0, C, sp)
        labs = [np.where(rng.random(sp) < 0.2, rng.integers(0, C, sp), base).astype(np.int16) for _ in range(raters)]
        out.append((f"case{i:02d}", p, labs))
    return out


def _write(root, cases, nifti=True):
    (root / "pred").mkdir()
    dirs = [root / f"rater{r}" for r in range(len(cases[0][2]))]
    for d in dirs:
        d.mkdir()
    affine = np.diag([*SPACING, 1.0])
    for name, p, labs in cases:
        np.save(root / "pred" / f"{name}.npy", p)
        for d, lab in zip(dirs, labs, strict=True):
            if nifti:
                nib.save(nib.Nifti1Image(lab, affine), d / f"{name}.nii.gz")
            else:
                np.save(d / f"{name}.npy", lab)
    return root / "pred", dirs


def _args(pred, dirs, out):
    return ["--pred", str(pred), *(a for d in dirs for a in ("--label", str(d))), "--out", str(out), "--no-progress"]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(s):
    return float("nan") if s == "nan" else float(s)


def _close(a, b, tol=1e-6):
    a, b = float(a), float(b)
    assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol, (a, b)


def test_raters_match_the_library(tmp_path, capsys):
    cases = _data()
    pred, dirs = _write(tmp_path, cases)
    out = tmp_path / "out"
    assert evaluate_main([*_args(pred, dirs, out), "--no-figures"]) == 0, capsys.readouterr().err
    assert "3 raters" in capsys.readouterr().out
    assert {"per_image.csv", "summary.csv", "summary.json", "dataset_histogram.npz"} == set(os.listdir(out))

    m = DatasetCalibration(C, to_onehot_y=True, multi_rater=True, keep_records=True, include_background=False)
    for name, p, labs in cases:
        x, t = torch.from_numpy(p)[None], torch.from_numpy(np.stack(labs).astype(np.int64))[None]
        m.update(x, t, image_ids=[name], spacing=SPACING)
    rows, recs = _read_csv(out / "per_image.csv"), m.records()
    assert len(rows) == len(recs) == len(cases) * (C - 1)
    for k, (name, p, labs) in enumerate(cases):
        x, t = torch.from_numpy(p)[None], torch.from_numpy(np.stack(labs).astype(np.int64))[None]
        # the functional calls, independently of the records: spacing must come from the NIfTI header
        kw = dict(to_onehot_y=True, include_background=False)
        crps = F.volume_crps(x, t, spacing=SPACING, **kw)[0]
        dice = F.consensus_dice(x, t, **kw)[0]
        # the CURVAS headline: per-rater errors, then the mean over raters
        per_rater = F.calibration_errors(x, t, num_bins=20, multi_rater=True, **kw)
        for j in range(C - 1):
            row, rec = rows[k * (C - 1) + j], recs[k * (C - 1) + j]
            assert row["case"] == name and int(row["class"]) == j + 1
            for f in ("ece", "ace", "mce", "l2", "volume_crps", "consensus_dice"):
                _close(_num(row[f]), rec[f])
            _close(_num(row["volume_crps"]), crps[j], tol=1e-5 * max(1.0, float(crps[j])))
            _close(_num(row["consensus_dice"]), dice[j])
            _close(_num(row["ece"]), per_rater.ece[0, :, j].mean())
    # volume CRPS in physical units differs from voxel counts: the header was read
    assert not torch.allclose(F.volume_crps(x, t, **kw), F.volume_crps(x, t, spacing=SPACING, **kw))

    res = m.compute()
    summary = _read_csv(out / "summary.csv")
    report = json.loads((out / "summary.json").read_text())
    assert report["raters"] == 3 and report["mode"] == "marginal" and report["cases"] == len(cases)
    assert [r["class"] for r in summary] == ["1", "2", "mean"]
    assert [r["class"] for r in report["summary"]] == [1, 2, "mean"]
    for k in range(C - 1):
        for kind in ("macro", "micro"):  # macro: mean over raters; micro: against the rater-mean label
            for f in ("ece", "ace", "mce", "l2"):
                want = float(getattr(getattr(res, kind), f)[k])
                _close(_num(summary[k][f"{kind}_{f}"]), want)
                _close(report["summary"][k][f"{kind}_{f}"], want)
        vals = [r["volume_crps"] for r in recs if r["class"] == k + 1]
        _close(_num(summary[k]["volume_crps_mean"]), np.mean(vals))
    with np.load(out / "dataset_histogram.npz") as z:
        np.testing.assert_array_equal(z["histogram"], m.histogram().numpy())


def test_groups_and_top_label_match_the_library(tmp_path, capsys):
    cases = _data(seed=1, raters=1)
    pred, dirs = _write(tmp_path, cases, nifti=False)
    groups = {"case00": "north", "case01": "south", "case02": "north", "case03": "south"}
    gfile = tmp_path / "groups.csv"
    gfile.write_text("case,group\n" + "".join(f"{c},{g}\n" for c, g in groups.items()))
    out = tmp_path / "out"
    extra = ["--groups", str(gfile), "--mode", "top_label", "--bootstrap-samples", "200", "--seed", "3"]
    assert evaluate_main([*_args(pred, dirs, out), *extra]) == 0, capsys.readouterr().err
    assert "groups_reliability_top_label.png" in os.listdir(out)
    assert (out / "groups_reliability_top_label.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    m = DatasetCalibration(C, to_onehot_y=True, mode="top_label", groups=("north", "south"), keep_records=True)
    for name, p, labs in cases:
        m.update(torch.from_numpy(p)[None], torch.from_numpy(labs[0].astype(np.int64))[None], [name], [groups[name]])
    res = m.compute()
    summary = _read_csv(out / "summary.csv")
    assert [r["class"] for r in summary] == ["top_label", "mean"]
    for f in ("ece", "ace", "mce", "l2"):
        _close(_num(summary[0][f"macro_{f}"]), res.macro.__getattribute__(f))
        _close(_num(summary[0][f"micro_{f}"]), res.micro.__getattribute__(f))
    rows = _read_csv(out / "groups.csv")
    assert [r["group"] for r in rows] == ["north", "south", "all", "gap"]
    assert all(r["class"] == "top_label" for r in rows)
    lib = {r["group"]: r for r in m.group_rows()}
    for f in ("ece", "ace", "mce", "l2"):
        boot = m.bootstrap(f, num_samples=200, seed=3)
        for r in rows:
            want = (
                {"macro_" + f: float(getattr(res.macro, f)), "micro_" + f: float(getattr(res.micro, f))}
                if r["group"] == "all"
                else lib[r["group"]]
            )
            _close(_num(r[f"macro_{f}"]), want[f"macro_{f}"])
            _close(_num(r[f"micro_{f}"]), want[f"micro_{f}"])
            ci = (
                boot["all"]
                if r["group"] == "all"
                else boot["gap"]
                if r["group"] == "gap"
                else boot["groups"][r["group"]]
            )
            _close(_num(r[f"macro_{f}_lower"]), ci.lower)
            _close(_num(r[f"macro_{f}_upper"]), ci.upper)
    report = json.loads((out / "summary.json").read_text())
    assert report["mode"] == "top_label" and [g["group"] for g in report["groups"]] == ["north", "south", "all", "gap"]
    per_image = _read_csv(out / "per_image.csv")
    assert [(r["case"], r["group"]) for r in per_image] == list(groups.items())
    # seeded: a second run gives the same intervals; --no-figures leaves the group figures out
    out2 = tmp_path / "out2"
    assert evaluate_main([*_args(pred, dirs, out2), *extra, "--no-figures"]) == 0
    assert _read_csv(out2 / "groups.csv") == rows
    assert not any(f.endswith(".png") for f in os.listdir(out2))


def _fails(tmp_path, capsys, argv, match, rc=1):
    out = tmp_path / "out"
    assert not out.exists()
    got = evaluate_main([*argv, "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert got == rc, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibops evaluate: error: "), captured.err
    for m in [match] if isinstance(match, str) else match:
        assert m in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()  # no partial output, not even an empty directory
    return lines[0]


def test_error_paths_write_nothing(tmp_path, capsys):
    cases = _data(seed=2, sizes=SIZES[:2])
    pred, dirs = _write(tmp_path, cases, nifti=False)
    base = ["--pred", str(pred), *(a for d in dirs for a in ("--label", str(d)))]
    g = tmp_path / "g.csv"

    # bad groups files: exit 1, naming the file, the line and the fix
    for text, match in [
        ("name,site\ncase00,a\ncase01,b\n", "case,group"),
        ("case,group\ncase00,a\n", "no group for 1 case(s): 'case01'"),
        ("case,group\ncase00,a\ncase01,b\ncase09,b\n", "'case09'"),
        ("case,group\ncase00,a\ncase00,b\ncase01,b\n", "line 3"),
        ("case,group\ncase00,a\ncase01,\n", "empty case or group"),
        ("case,group\ncase00,gap\ncase01,b\n", "reserved"),
    ]:
        g.write_text(text)
        _fails(tmp_path, capsys, [*base, "--groups", str(g)], [str(g), match])
    _fails(tmp_path, capsys, [*base, "--groups", str(tmp_path / "none.csv")], "--groups", rc=2)
    _fails(tmp_path, capsys, [*base, "--dice"], "--dice", rc=2)
    _fails(tmp_path, capsys, [*base, "--label", str(dirs[0])], "twice", rc=2)

    # a case missing in one rater folder: the folder and the case named
    os.rename(dirs[1] / "case01.npy", tmp_path / "moved.npy")
    _fails(tmp_path, capsys, base, [str(dirs[1]), "rater 2 of 3", "'case01'"])
    os.rename(tmp_path / "moved.npy", dirs[1] / "case01.npy")

    # raters' label maps of one case differing in shape: both files named
    np.save(dirs[2] / "case00.npy", cases[0][2][2][:-1])
    _fails(tmp_path, capsys, base, [str(dirs[0] / "case00.npy"), str(dirs[2] / "case00.npy"), "same grid"])
    np.save(dirs[2] / "case00.npy", cases[0][2][2])

    # a label out of range in one rater: that rater's file named
    bad = cases[1][2][1].copy()
    bad[0, 0, 0] = 9
    np.save(dirs[1] / "case01.npy", bad)
    _fails(tmp_path, capsys, base, [str(dirs[1] / "case01.npy"), "outside [0, 3)"])
    np.save(dirs[1] / "case01.npy", cases[1][2][1])
    assert evaluate_main([*base, "--out", str(tmp_path / "ok"), "--no-progress", "--no-figures"]) == 0
