"""``calibops evaluate`` on small NIfTI and NumPy data sets written by the tests.

The outputs (per-image CSV, summary CSV, histogram arrays, figures) are checked against
DatasetCalibration fed the same arrays. Every failure must be exactly one line
``calibops evaluate: error: ...`` naming the file (or option) and the fix, with exit status 2 for usage
errors and 1 for data errors, and leave no output file.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from calibops.cli.evaluate import evaluate_main
from calibops.metrics import DatasetCalibration

nib = pytest.importorskip("nibabel")
pytest.importorskip("matplotlib")

C = 3
SIZES = [(10, 9, 4), (7, 8, 5), (6, 6, 6)]
OUTPUTS = {"per_image.csv", "summary.csv", "dataset_histogram.png", "dataset_histogram.pdf", "dataset_histogram.npz"}


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
    if kw.get("mode") != "top_label":
        kw.setdefault("include_background", False)  # the CLI's own default: class 0 left out
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
    rc = evaluate_main(
        [
            "--pred",
            str(pred),
            "--label",
            str(label),
            "--out",
            str(out),
            "--no-progress",
            "--class-names",
            "bg,liver,tumour",
            "--dice",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    m = _expected(cases)
    _check_outputs(out, cases, m, names=["bg", "liver", "tumour"])
    rows = _read_csv(out / "per_image.csv")
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert "liver" in capsys.readouterr().out


def test_numpy_dataset_and_main_dispatch(tmp_path, capsys):
    from calibops.cli.main import main

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
    rc = evaluate_main(
        [
            "--pred",
            str(pred),
            "--label",
            str(label),
            "--out",
            str(out),
            "--softmax",
            "--include-background",
            "--ignore-index",
            "7",
            "--num-bins",
            "8",
            "--no-progress",
        ]
    )
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
        [sys.executable, "-m", "calibops", "evaluate", "--pred", str(pred), "--label", str(label), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert OUTPUTS <= set(os.listdir(out))
    assert "2 cases" in proc.stdout


def _fails(tmp_path, capsys, pred, label, *extra, match, rc=1, out=None):
    out = tmp_path / "out" if out is None else out
    before = sorted(os.listdir(out)) if out.is_dir() else None
    args = ["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress", *extra]
    got = evaluate_main(args)
    captured = capsys.readouterr()
    err = captured.err
    assert got == rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibops evaluate: error: "), err  # one line, no traceback
    assert match in err, err
    assert "Traceback" not in err + captured.out
    if out.is_dir():
        assert sorted(os.listdir(out)) == (before or [])  # never a partial result
    else:
        assert before is None
    return lines[0]


def test_missing_pairs(tmp_path, capsys):
    cases = _cases()
    pred, label = _write_nifti(tmp_path, cases)
    os.remove(label / "case01.nii.gz")
    nib.save(nib.Nifti1Image(cases[0][2], np.eye(4)), label / "extra.nii.gz")
    _fails(tmp_path, capsys, pred, label, match="'case01'")
    _fails(tmp_path, capsys, pred, label, match="'extra'")
    _fails(tmp_path, capsys, tmp_path / "nowhere", label, match="--pred", rc=2)


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
    rc = evaluate_main(
        ["--pred", str(pred), "--label", str(label), "--out", str(tmp_path / "o"), "--multilabel", "--no-progress"]
    )
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
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("calibops evaluate: error: ") and "--pred" in err
    assert evaluate_main(["--pred", "a", "--label", "b", "--num-bins", "0"]) == 2
    assert "--num-bins" in capsys.readouterr().err
    assert evaluate_main(["--pred", "a", "--label", "b", "--frobnicate"]) == 2
    assert "--frobnicate" in capsys.readouterr().err


# ------------------------------------------------------------------ every failure: one line, exit 1 or 2
def _numpy_set(tmp_path, n=2):
    cases = _cases(sizes=SIZES[:n])
    (tmp_path / "pred").mkdir()
    (tmp_path / "label").mkdir()
    for name, p, lab in cases:
        np.save(tmp_path / "pred" / f"{name}.npy", p)
        np.save(tmp_path / "label" / f"{name}.npy", lab)
    return cases, tmp_path / "pred", tmp_path / "label"


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def test_corrupt_npz(tmp_path, capsys):
    cases, pred, label = _numpy_set(tmp_path)
    os.remove(pred / "case01.npy")
    (pred / "case01.npz").write_bytes(b"this is not a zip archive")
    line = _fails(tmp_path, capsys, pred, label, match=str(pred / "case01.npz"))
    assert "not a NumPy .npz" in line and "numpy.savez" in line  # the cause and the fix
    np.savez(pred / "case01.npz", probabilities=cases[1][1])
    _truncate(pred / "case01.npz", 200)
    assert "numpy.savez" in _fails(tmp_path, capsys, pred, label, match=str(pred / "case01.npz"))


def test_empty_and_truncated_npy(tmp_path, capsys):
    _, pred, label = _numpy_set(tmp_path)
    (pred / "case00.npy").write_bytes(b"")
    line = _fails(tmp_path, capsys, pred, label, match=str(pred / "case00.npy"))
    assert "empty" in line and "numpy.save" in line
    np.save(pred / "case00.npy", _cases()[0][1])
    _truncate(pred / "case00.npy", 300)
    assert "truncated" in _fails(tmp_path, capsys, pred, label, match=str(pred / "case00.npy"))
    np.save(pred / "case00.npy", _cases()[0][1])
    (label / "case01.npy").write_bytes(b"\x1f\x8b not numpy at all")
    assert "not a NumPy .npy" in _fails(tmp_path, capsys, pred, label, match=str(label / "case01.npy"))


@pytest.mark.parametrize("which", ["pred", "label"])
@pytest.mark.parametrize("damage", ["garbage", "truncated_header", "truncated_data"])
def test_corrupt_or_truncated_nifti(tmp_path, capsys, which, damage):
    cases = _cases(sizes=[(24, 20, 16), (6, 6, 6)])  # big enough that a cut keeps the header
    pred, label = _write_nifti(tmp_path, cases)
    path = (pred if which == "pred" else label) / "case00.nii.gz"
    if damage == "garbage":
        path.write_bytes(b"not gzip, not nifti")
    elif damage == "truncated_header":
        _truncate(path, 40)
    else:
        _truncate(path, len(path.read_bytes()) // 2)
    line = _fails(tmp_path, capsys, pred, label, match=str(path))
    assert "cannot read" in line and "re-export" in line


def test_out_naming_an_existing_file(tmp_path, capsys):
    _, pred, label = _numpy_set(tmp_path)
    out = tmp_path / "results.csv"
    out.write_text("keep me")
    line = _fails(tmp_path, capsys, pred, label, match=str(out), rc=2, out=out)
    assert "existing file" in line
    assert out.read_text() == "keep me"


def test_out_not_writable(tmp_path, capsys, monkeypatch):
    _, pred, label = _numpy_set(tmp_path)
    out = tmp_path / "new" / "out"

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("calibops.cli.outputs.tempfile.mkdtemp", refuse)
    assert "writable" in _fails(tmp_path, capsys, pred, label, match=str(out), out=out)
    assert not out.exists()  # the directory made for the outputs is removed again


def test_missing_directories_and_files(tmp_path, capsys, monkeypatch):
    _, pred, label = _numpy_set(tmp_path)
    _fails(tmp_path, capsys, pred, tmp_path / "nowhere", match="--label", rc=2)
    _fails(tmp_path, capsys, pred / "case00.npy", label, match="--pred", rc=2)  # a file, not a directory
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "point to the directory" in _fails(tmp_path, capsys, empty, label, match=str(empty))


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    # chmod cannot make a file unreadable for root, so the read itself is made to fail
    _, pred, label = _numpy_set(tmp_path)
    real_open = open

    def guarded(path, *args, **kwargs):
        if os.fspath(path).endswith("case01.npy") and "label" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)
    line = _fails(tmp_path, capsys, pred, label, match=str(label / "case01.npy"))
    assert "permission denied" in line and "readable" in line


def test_label_prediction_shape_mismatch_numpy(tmp_path, capsys):
    cases, pred, label = _numpy_set(tmp_path)
    np.save(label / "case01.npy", cases[1][2][:, :3])
    line = _fails(tmp_path, capsys, pred, label, match=str(label / "case01.npy"))
    assert "does not match" in line and str(pred / "case01.npy") in line


def test_empty_arrays_and_bad_dtypes(tmp_path, capsys):
    _, pred, label = _numpy_set(tmp_path)
    np.save(pred / "case00.npy", np.zeros((3, 0, 4), np.float32))
    np.save(label / "case00.npy", np.zeros((0, 4), np.int64))
    assert "no voxel" in _fails(tmp_path, capsys, pred, label, match=str(pred / "case00.npy"))
    np.save(pred / "case00.npy", _cases()[0][1])
    np.save(label / "case00.npy", np.array(["a", "b"]))
    assert "integer class indices" in _fails(tmp_path, capsys, pred, label, match=str(label / "case00.npy"))
    np.save(label / "case00.npy", np.array([{}], dtype=object), allow_pickle=True)
    _fails(tmp_path, capsys, pred, label, match=str(label / "case00.npy"))


def test_usage_errors_exit_2(tmp_path, capsys):
    _, pred, label = _numpy_set(tmp_path)
    _fails(tmp_path, capsys, pred, label, "--backend", "bogus", match="--backend", rc=2)
    _fails(tmp_path, capsys, pred, label, "--backend", "cuda", match="--backend cuda", rc=2)
    _fails(tmp_path, capsys, pred, label, "--num-bins", str(2**24 + 1), match="--num-bins", rc=2)
    _fails(tmp_path, capsys, pred, label, "--num-classes", "0", match="--num-classes", rc=2)
    _fails(tmp_path, capsys, pred, label, "--sum-tolerance", "nan", match="--sum-tolerance", rc=2)
    _fails(tmp_path, capsys, pred, label, "--class-names", "a,b", match="--class-names", rc=2)
    _fails(tmp_path, capsys, pred, label, "--class-names", "a,,b", match="--class-names", rc=2)


def test_unexpected_errors_are_one_line_too(tmp_path, capsys, monkeypatch):
    _, pred, label = _numpy_set(tmp_path)

    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr("calibops.cli.evaluate._print_summary", boom)
    monkeypatch.setattr("calibops.cli.evaluate.evaluate", boom)
    _fails(tmp_path, capsys, pred, label, match="unexpected KeyError")
    monkeypatch.setenv("CALIBOPS_DEBUG", "1")
    with pytest.raises(KeyError):
        evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(tmp_path / "o"), "--no-progress"])


def test_summary_counts_cases_with_each_class(tmp_path, capsys):
    # class 1 only in case00, class 2 only in case01: every case counts for each class's macro average
    cases, pred, label = _numpy_set(tmp_path)
    np.save(label / "case00.npy", np.where(np.arange(cases[0][2].size).reshape(cases[0][2].shape) < 7, 1, 0))
    np.save(label / "case01.npy", np.where(np.arange(cases[1][2].size).reshape(cases[1][2].shape) < 3, 2, 0))
    out = tmp_path / "out"
    assert evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress"]) == 0
    rows = _read_csv(out / "summary.csv")
    assert [(r["class"], r["cases"], r["cases_with_class"]) for r in rows[:2]] == [("1", "2", "1"), ("2", "2", "1")]
