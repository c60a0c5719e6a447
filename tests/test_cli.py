"""``calibops evaluate`` on small NIfTI and NumPy data sets written by the tests.

The outputs (per-image CSV, summary CSV, histogram arrays, figures) are checked against
DatasetCalibration fed the same arrays; bad data sets must fail with a message, exit status 1, and no
output files.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from calibops.cli import evaluate_main
from calibops.metrics import DatasetCalibration

nib = pytest.importorskip("nibabel")
pytest.importorskip("matplotlib")

C = 3
SIZES = [(10, 9, 4), (7, 8, 5), (6, 6, 6)]
OUTPUTS = {"per_image.csv", "summary.csv", "dataset_histogram.png", "dataset_histogram.pdf",
           "dataset_histogram.npz"}


def _cases(seed=0, sizes=SIZES, logits=False):
    rng = np.random.default_rng(seed)
    out = []
    for i, sp in enumerate(sizes):
        z = 2 * rng.normal(size=(C, *sp))
        p = z if logits else np.exp(z) / np.exp(z).sum(0, keepdims=True)
        lab = rng.integers(0, C, sp)
        out.append((f"case{i:02d}", p.astype(np.float32), lab.astype(np.int16)))
    return out


def _write_nifti(root, cases):
    (root / "pred").mkdir()
    (root / "label").mkdir()
    for name, p, lab in cases:
        nib.save(nib.Nifti1Image(np.moveaxis(p, 0, -1), np.eye(4)), root / "pred" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "label" / f"{name}.nii.gz")
    return root / "pred", root / "label"


def _write_numpy(root, cases):
    (root / "pred").mkdir()
    (root / "label").mkdir()
    for k, (name, p, lab) in enumerate(cases):
        if k % 2:
            np.savez(root / "pred" / f"{name}.npz", probabilities=p, extra=np.zeros(3))
        else:
            np.save(root / "pred" / f"{name}.npy", p)
        np.savez_compressed(root / "label" / f"{name}.npz", lab[None])  # leading singleton channel
    return root / "pred", root / "label"


def _expected(cases, **kw):
    m = DatasetCalibration(C, to_onehot_y=True, keep_records=True, **kw)
    for name, p, lab in cases:
        m.update(torch.from_numpy(p)[None], torch.from_numpy(lab.astype(np.int64))[None], image_ids=[name])
    return m


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(out, cases, m, names=None):
    assert OUTPUTS <= set(os.listdir(out))
    names = names or [f"class {c}" for c in range(C)]
    rows = _read_csv(out / "per_image.csv")
    recs = m.records()
    assert len(rows) == len(recs) == len(cases) * (C - 1)
    for row, rec in zip(rows, recs, strict=True):
        assert row["case"] == rec["image"] and int(row["class"]) == rec["class"]
        assert row["class_name"] == names[rec["class"]]
        for k in ("ece", "ace", "mce"):
            assert float(row[k]) == pytest.approx(rec[k], abs=1e-6)
        assert int(row["voxels"]) == rec["voxels"]
    res = m.compute()
    summary = _read_csv(out / "summary.csv")
    assert [r["class"] for r in summary] == ["1", "2", "mean"]
    for k in range(2):
        r = summary[k]
        assert int(r["cases"]) == len(cases)
        for kind in ("macro", "micro"):
            errs = getattr(res, kind)
            for f in ("ece", "ace", "mce"):
                assert float(r[f"{kind}_{f}"]) == pytest.approx(float(getattr(errs, f)[k]), abs=1e-6)
    assert float(summary[2]["macro_ece"]) == pytest.approx(float(res.macro.ece.mean()), abs=1e-6)
    with np.load(out / "dataset_histogram.npz") as z:
        np.testing.assert_array_equal(z["histogram"], m.histogram().numpy())
        np.testing.assert_array_equal(z["classes"], [1, 2])
        np.testing.assert_allclose(z["counts"], m.pooled_counts().numpy())
    assert (out / "dataset_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "dataset_histogram.pdf").read_bytes()[:5] == b"%PDF-"


def test_nifti_dataset(tmp_path, capsys):
    cases = _cases()
    pred, label = _write_nifti(tmp_path, cases)
    out = tmp_path / "out"
    rc = evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress",
                        "--class-names", "bg,liver,tumour", "--dice"])
    assert rc == 0, capsys.readouterr().err
    m = _expected(cases)
    _check_outputs(out, cases, m, names=["bg", "liver", "tumour"])
    rows = _read_csv(out / "per_image.csv")
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert "liver" in capsys.readouterr().out


def test_numpy_dataset_and_main_dispatch(tmp_path, capsys):
    from calibops.__main__ import main

    cases = _cases(seed=1, sizes=[(12, 10), (9, 7), (5, 13), (8, 8)])
    pred, label = _write_numpy(tmp_path, cases)
    out = tmp_path / "out"
    rc = main(["evaluate", "--pred", str(pred), "--label", str(label), "--out", str(out), "--num-bins", "20"])
    assert rc == 0, capsys.readouterr().err
    _check_outputs(out, cases, _expected(cases))


def test_logits_include_background_ignore_index(tmp_path, capsys):
    cases = _cases(seed=2, logits=True)
    for _, _, lab in cases:
        lab[:2] = 7
    pred, label = _write_nifti(tmp_path, cases)
    out = tmp_path / "out"
    rc = evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--softmax",
                        "--include-background", "--ignore-index", "7", "--num-bins", "8", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m = _expected(cases, softmax=True, include_background=True, ignore_index=7, num_bins=8)
    with np.load(out / "dataset_histogram.npz") as z:
        assert z["histogram"].shape == (C, 8, 8)
        np.testing.assert_array_equal(z["histogram"], m.histogram().numpy())
    summary = _read_csv(out / "summary.csv")
    assert [r["class"] for r in summary] == ["0", "1", "2", "mean"]
    assert float(summary[0]["micro_ace"]) == pytest.approx(float(m.compute().micro.ace[0]), abs=1e-6)


def test_python_dash_m(tmp_path):
    cases = _cases(seed=3, sizes=[(6, 5, 4), (5, 5, 5)])
    pred, label = _write_nifti(tmp_path, cases)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "calibops", "evaluate", "--pred", str(pred), "--label", str(label), "--out",
         str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert OUTPUTS <= set(os.listdir(out))
    assert "2 cases" in proc.stdout


def _fails(tmp_path, capsys, pred, label, *extra, match):
    out = tmp_path / "out"
    args = ["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress", *extra]
    rc = evaluate_main(args)
    err = capsys.readouterr().err
    assert rc == 1
    assert match in err, err
    assert not out.exists() or os.listdir(out) == []  # never a partial result


def test_missing_pairs(tmp_path, capsys):
    cases = _cases()
    pred, label = _write_nifti(tmp_path, cases)
    os.remove(label / "case01.nii.gz")
    nib.save(nib.Nifti1Image(cases[0][2], np.eye(4)), label / "extra.nii.gz")
    _fails(tmp_path, capsys, pred, label, match="'case01'")
    _fails(tmp_path, capsys, pred, label, match="'extra'")
    _fails(tmp_path, capsys, tmp_path / "nowhere", label, match="not found")


def test_shape_mismatch(tmp_path, capsys):
    cases = _cases()
    pred, label = _write_nifti(tmp_path, cases)
    nib.save(nib.Nifti1Image(cases[2][2][:5], np.eye(4)), label / "case02.nii.gz")
    _fails(tmp_path, capsys, pred, label, match="case02")
    _fails(tmp_path, capsys, pred, label, match="does not match")


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p * 3, "not probabilities"),
        (lambda p: np.where(np.arange(p.size).reshape(p.shape) == 5, np.nan, p), "NaN"),
        (lambda p: p * 0.5, "sum to 1"),
        (lambda p: p[:2], "channels"),
    ],
    ids=["range", "nan", "sum", "channels"],
)
def test_non_probability_inputs(tmp_path, capsys, corrupt, match):
    cases = _cases()
    name, p, lab = cases[1]
    cases[1] = (name, corrupt(p).astype(np.float32), lab)
    pred, label = _write_nifti(tmp_path, cases)
    _fails(tmp_path, capsys, pred, label, match=match)


def test_non_finite_logits(tmp_path, capsys):
    cases = _cases(logits=True)
    cases[0][1][0, 0, 0, 0] = np.inf
    pred, label = _write_nifti(tmp_path, cases)
    _fails(tmp_path, capsys, pred, label, "--softmax", match="logits hold NaN or infinite")


def test_multilabel_accepts_independent_channels(tmp_path, capsys):
    cases = [(n, p * 0.5, lab) for n, p, lab in _cases()]
    pred, label = _write_nifti(tmp_path, cases)
    rc = evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(tmp_path / "o"),
                        "--multilabel", "--no-progress"])
    assert rc == 0, capsys.readouterr().err


def test_labels_out_of_range_and_non_integer(tmp_path, capsys, monkeypatch):
    cases = _cases()
    cases[0][2][0, 0, 0] = 5
    pred, label = _write_nifti(tmp_path, cases)
    _fails(tmp_path, capsys, pred, label, match="outside [0, 3)")
    _fails(tmp_path, capsys, pred, label, "--ignore-index", "4", match="or --ignore-index 4, e.g. [5]")
    monkeypatch.setenv("CALIBOPS_VALIDATE", "0")  # the CLI checks labels itself
    _fails(tmp_path, capsys, pred, label, match="outside [0, 3)")
    monkeypatch.delenv("CALIBOPS_VALIDATE")
    cases[0][2][0, 0, 0] = 1
    nib.save(nib.Nifti1Image(cases[0][2], np.eye(4)), label / "case00.nii.gz")
    nib.save(nib.Nifti1Image(cases[1][2].astype(np.float32) + 0.5, np.eye(4)), label / "case01.nii.gz")
    _fails(tmp_path, capsys, pred, label, match="non-integer")


def test_usage(capsys):
    assert evaluate_main(["--help"]) == 0
    assert "--include-background" in capsys.readouterr().out
    assert evaluate_main([]) == 2
    assert evaluate_main(["--pred", "a", "--label", "b", "--num-bins", "0"]) == 1
