"""``calibops evaluate`` on real output-folder layouts, built by the tests.

- nnU-Net: ``case.npz`` (key ``probabilities``, (C, z, y, x)) next to ``case.nii.gz`` (the segmentation)
  and ``case.pkl``; labels as NIfTI (x, y, z). The probabilities must be read in the label's axis order
  (checked against a metric fed the correctly transposed arrays), also for cubic volumes, where only the
  segmentation next to the .npz can tell the order.
- MONAI ``SaveImage`` folders (one folder per case, ``case_seg.nii.gz``, channel in NIfTI dimension 5) with
  ``--pred-suffix _seg``; SimpleITK ``.mha`` labels.
- Spacing / affine mismatches, the per-class spread in summary.csv, ``--no-figures``, a missing matplotlib
  found before any case is read, and the top-level ``--help``.
"""

from __future__ import annotations

import csv
import math
import sys

import numpy as np
import pytest
import torch

from calibops.cli.evaluate import evaluate_main, spread
from calibops.metrics import DatasetCalibration

nib = pytest.importorskip("nibabel")

C = 3


def _probs_labels(rng, shape):
    z = 2 * rng.normal(size=(C, *shape))
    p = (np.exp(z) / np.exp(z).sum(0, keepdims=True)).astype(np.float32)
    # labels agree with the argmax most of the time (so the segmentation next to the npz tells the order)
    lab = p.argmax(0)
    flip = rng.random(shape) < 0.3
    lab[flip] = rng.integers(0, C, int(flip.sum()))
    return p, lab.astype(np.int16)


def _affine(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _nnunet_folder(tmp_path, shapes, seed=0, seg_spacing=(1.0, 1.0, 2.0)):
    """Predictions as nnU-Net writes them; returns the (name, p (C, x, y, z), label (x, y, z)) truth."""
    rng = np.random.default_rng(seed)
    pred, label = tmp_path / "pred", tmp_path / "labelsTs"
    pred.mkdir()
    label.mkdir()
    truth = []
    for i, shape in enumerate(shapes):
        name = f"case_{i:03d}"
        p, lab = _probs_labels(rng, shape)  # (C, x, y, z) in nibabel order
        np.savez_compressed(pred / f"{name}.npz", probabilities=np.transpose(p, (0, 3, 2, 1)))  # (C, z, y, x)
        nib.save(nib.Nifti1Image(p.argmax(0).astype(np.uint8), _affine(seg_spacing)), pred / f"{name}.nii.gz")
        (pred / f"{name}.pkl").write_bytes(b"not read")
        nib.save(nib.Nifti1Image(lab, _affine()), label / f"{name}.nii.gz")
        truth.append((name, p, lab))
    return pred, label, truth


def _expected(truth, **kw):
    if kw.get("mode") != "top_label":
        kw.setdefault("include_background", False)  # the CLI's own default: class 0 left out
    m = DatasetCalibration(C, keep_records=True, to_onehot_y=True, **kw)
    for name, p, lab in truth:
        m.update(torch.from_numpy(p)[None], torch.from_numpy(lab.astype(np.int64))[None], image_ids=[name])
    return m


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_per_image(out, m):
    rows = _rows(out / "per_image.csv")
    recs = m.records()
    assert len(rows) == len(recs)
    for row, rec in zip(rows, recs, strict=True):
        assert row["case"] == rec["image"]
        for k in ("ece", "ace", "mce"):
            assert float(row[k]) == pytest.approx(rec[k], abs=1e-6)


def test_nnunet_folder(tmp_path, capsys):
    pred, label, truth = _nnunet_folder(tmp_path, [(9, 7, 5), (6, 8, 4)])
    out = tmp_path / "out"
    rc = evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress", "--no-figures"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "reversed" in cap.out  # the axis order it took, and why
    _check_per_image(out, _expected(truth))
    assert not (out / "dataset_histogram.png").exists()  # --no-figures


def test_nnunet_cubic_volume_order_from_segmentation(tmp_path, capsys):
    pred, label, truth = _nnunet_folder(tmp_path, [(6, 6, 6)], seed=3)
    out = tmp_path / "out"
    rc = evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress", "--no-figures"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "segmentation case_000.nii.gz" in cap.out
    _check_per_image(out, _expected(truth))
    # forcing the other order gives different numbers (the test can fail)
    out2 = tmp_path / "out2"
    args = ["--pred", str(pred), "--label", str(label), "--out", str(out2), "--no-progress", "--no-figures"]
    assert evaluate_main([*args, "--pred-axis-order", "same"]) == 0
    assert _rows(out2 / "per_image.csv") != _rows(out / "per_image.csv")


def test_axis_order_mismatch_and_ambiguity_errors(tmp_path, capsys):
    pred, label, truth = _nnunet_folder(tmp_path, [(9, 7, 5)])
    args = ["--pred", str(pred), "--label", str(label), "--out", str(tmp_path / "o"), "--no-progress", "--no-figures"]
    assert evaluate_main([*args, "--pred-axis-order", "same"]) == 1
    err = capsys.readouterr().err
    assert "case_000.npz" in err and "--pred-axis-order" in err
    # a plain .npy of a symmetric shape, no segmentation next to it: ask, never guess
    d = tmp_path / "plain"
    (d / "p").mkdir(parents=True)
    (d / "l").mkdir()
    p, lab = _probs_labels(np.random.default_rng(1), (5, 5, 5))
    np.save(d / "p" / "a.npy", p)
    nib.save(nib.Nifti1Image(lab, _affine()), d / "l" / "a.nii.gz")
    rc = evaluate_main(["--pred", str(d / "p"), "--label", str(d / "l"), "--out", str(d / "o"), "--no-figures"])
    assert rc == 1 and "--pred-axis-order same" in capsys.readouterr().err


def test_spacing_and_affine_mismatch(tmp_path, capsys):
    pred, label, _ = _nnunet_folder(tmp_path, [(9, 7, 5)], seg_spacing=(1.0, 1.0, 3.0))
    args = ["--pred", str(pred), "--label", str(label), "--out", str(tmp_path / "o"), "--no-progress", "--no-figures"]
    assert evaluate_main(args) == 1
    err = capsys.readouterr().err
    assert "not on the same grid" in err and "[1.0, 1.0, 3.0]" in err and "--no-geometry-check" in err
    assert not (tmp_path / "o").exists()
    assert evaluate_main([*args, "--no-geometry-check"]) == 0


def test_origin_mismatch_between_nifti_files(tmp_path, capsys):
    rng = np.random.default_rng(2)
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    p, lab = _probs_labels(rng, (6, 5, 4))
    nib.save(nib.Nifti1Image(np.moveaxis(p, 0, -1), _affine(origin=(0, 0, 5.0))), tmp_path / "p" / "a.nii.gz")
    nib.save(nib.Nifti1Image(lab, _affine()), tmp_path / "l" / "a.nii.gz")
    rc = evaluate_main(
        ["--pred", str(tmp_path / "p"), "--label", str(tmp_path / "l"), "--no-figures", "--out", str(tmp_path / "o")]
    )
    assert rc == 1 and "different origin/orientation" in capsys.readouterr().err


def test_monai_saveimage_folder_and_sitk_labels(tmp_path, capsys):
    pytest.importorskip("monai")
    sitk = pytest.importorskip("SimpleITK")
    from monai.data import MetaTensor
    from monai.transforms import SaveImage

    rng = np.random.default_rng(4)
    pred, label = tmp_path / "pred", tmp_path / "label"
    label.mkdir()
    saver = SaveImage(output_dir=str(pred), output_postfix="seg", separate_folder=True, print_log=False)
    truth = []
    for i, shape in enumerate([(8, 7, 5), (6, 9, 4)]):
        name = f"img{i}"
        p, lab = _probs_labels(rng, shape)
        saver(
            MetaTensor(
                torch.from_numpy(p), affine=torch.from_numpy(_affine()), meta={"filename_or_obj": f"{name}.nii.gz"}
            )
        )
        img = sitk.GetImageFromArray(np.transpose(lab, (2, 1, 0)).copy())  # SimpleITK arrays are (z, y, x)
        img.SetSpacing((1.0, 1.0, 2.0))
        img.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # RAS identity seen in LPS
        sitk.WriteImage(img, str(label / f"{name}.mha"))
        truth.append((name, p, lab))
    assert (pred / "img0" / "img0_seg.nii.gz").is_file()
    out = tmp_path / "out"
    rc = evaluate_main(
        [
            "--pred",
            str(pred),
            "--label",
            str(label),
            "--pred-suffix",
            "_seg",
            "--out",
            str(out),
            "--no-progress",
            "--no-figures",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    _check_per_image(out, _expected(truth))


def test_summary_spread_columns(tmp_path, capsys):
    pred, label, truth = _nnunet_folder(tmp_path, [(9, 7, 5), (6, 8, 4), (5, 5, 7), (7, 6, 6)], seed=5)
    out = tmp_path / "out"
    assert evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out), "--no-progress"]) == 0
    assert "median [IQR]" in capsys.readouterr().out
    assert (out / "dataset_histogram.png").is_file()
    m = _expected(truth)
    summary = _rows(out / "summary.csv")
    for row in summary[:2]:
        c = int(row["class"])
        for metric in ("ece", "ace", "mce"):
            v = np.array([r[metric] for r in m.records() if r["class"] == c])
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            assert float(row[f"{metric}_median"]) == pytest.approx(med, abs=1e-6)
            assert float(row[f"{metric}_iqr"]) == pytest.approx(q3 - q1, abs=1e-6)
            assert float(row[f"{metric}_std"]) == pytest.approx(v.std(ddof=1), abs=1e-6)
            assert float(row[f"macro_{metric}"]) == pytest.approx(v.mean(), abs=1e-6)


def test_spread_helper():
    d = spread([0.1, float("nan"), 0.3, 0.2, 0.4])
    assert d["mean"] == pytest.approx(0.25) and d["median"] == pytest.approx(0.25)
    assert d["q1"] == pytest.approx(0.175) and d["iqr"] == pytest.approx(0.15)
    assert math.isnan(spread([0.5])["std"]) and math.isnan(spread([])["mean"])


def test_missing_matplotlib_is_found_before_any_case(tmp_path, capsys, monkeypatch):
    pred, label, _ = _nnunet_folder(tmp_path, [(4, 4, 3)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    import calibops.io as cio

    read = []
    monkeypatch.setattr(cio, "load_array", lambda *a, **k: read.append(a) or (_ for _ in ()).throw(AssertionError))
    out = tmp_path / "out"
    rc = evaluate_main(["--pred", str(pred), "--label", str(label), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "matplotlib" in err and "--no-figures" in err
    assert read == [] and not out.exists()


def test_pred_suffix_picks_files_and_duplicate_message(tmp_path, capsys):
    pred, label, truth = _nnunet_folder(tmp_path, [(5, 6, 4)])
    np.save(pred / "case_000.npy", np.zeros((C, 4, 6, 5), np.float32))  # a second array for the case
    args = ["--pred", str(pred), "--label", str(label), "--out", str(tmp_path / "o"), "--no-progress", "--no-figures"]
    assert evaluate_main(args) == 1
    assert "--pred-suffix" in capsys.readouterr().err
    assert evaluate_main([*args, "--pred-suffix", ".npz"]) == 0
    _check_per_image(tmp_path / "o", _expected(truth))


def test_top_level_help_lists_subcommands(capsys):
    from calibops.cli.main import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("evaluate", "demo", "selfcheck", "check"):
        assert cmd in out
    assert main(["nonsense"]) == 2 and "calibops --help" in capsys.readouterr().err
