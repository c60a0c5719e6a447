"""``calibops compare`` on ``calibops evaluate`` outputs, and what evaluate writes for it: units, Dice in the
summary and on the console, class names in every CSV.

The table's numbers are checked against the run folders they come from (summary.json for the point values, the
per-case values of per_image.csv for the bootstrap), the differences against the first run, and a run compared
with itself gives differences of exactly zero with a zero-width interval (the paired bootstrap).
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from calibops.__main__ import main as calibops_main
from calibops.cli.evaluate import evaluate_main
from calibops.cli.compare import comparison_rows, load_run
from calibops.cli.compare import main as compare_main

nib = pytest.importorskip("nibabel")
pytest.importorskip("matplotlib")

C = 3
SIZES = [(7, 6, 5), (6, 5, 4), (5, 7, 3), (6, 6, 4)] * 2
SPACING = (0.5, 1.25, 2.0)


def _write_cases(root, seed, raters=1, nifti=True):
    rng = np.random.default_rng(seed)
    (root / "pred").mkdir(parents=True)
    dirs = [root / f"rater{r}" for r in range(raters)]
    for d in dirs:
        d.mkdir()
    for i, sp in enumerate(SIZES):
        z = 2 * rng.normal(size=(C, *sp))
        p = (np.exp(z) / np.exp(z).sum(0, keepdims=True)).astype(np.float32)
        np.save(root / "pred" / f"case{i:02d}.npy", p)
        base = rng.integers(0, C, sp)
        for d in dirs:
            lab = np.where(rng.random(sp) < 0.2, rng.integers(0, C, sp), base).astype(np.int16)
            if nifti:
                nib.save(nib.Nifti1Image(lab, np.diag([*SPACING, 1.0])), d / f"case{i:02d}.nii.gz")
            else:
                np.save(d / f"case{i:02d}.npy", lab)
    return root / "pred", dirs


def _evaluate(tmp_path, name, seed, *extra, raters=1, nifti=True):
    pred, dirs = _write_cases(tmp_path / f"data_{name}", seed, raters, nifti)
    out = tmp_path / name
    argv = ["--pred", str(pred), *(a for d in dirs for a in ("--label", str(d))), "--out", str(out), "--no-progress"]
    assert evaluate_main([*argv, "--class-names", "background,liver,kidney", "--include-background", *extra]) == 0
    return out


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return _evaluate(tmp, "a", 0, "--dice"), _evaluate(tmp, "b", 1, "--dice")


def test_evaluate_reports_dice_units_and_class_names(two_runs, tmp_path, capsys):
    a, _ = two_runs
    summary = json.loads((a / "summary.json").read_text())
    assert summary["units"]["ece"] == "probability" and summary["units"]["dice"] == "fraction"
    per_image = _csv(a / "per_image.csv")
    assert {r["class_name"] for r in per_image} == {"background", "liver", "kidney"}
    for row in summary["summary"][:-1]:  # Dice in the summary: the mean of the per-case Dice
        dice = [float(r["dice"]) for r in per_image if r["class_name"] == row["class_name"] and r["dice"] != "nan"]
        assert row["dice_mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert "dice_mean" in _csv(a / "summary.csv")[0]
    # the console: a run with --dice prints the Dice per class
    out = _evaluate(tmp_path, "c", 2, "--dice", "--no-figures")
    printed = capsys.readouterr().out
    assert printed.count("Dice ") >= 3 and out.is_dir()


def test_raters_volume_crps_has_its_unit_and_groups_csv_class_names(tmp_path, capsys):
    groups = tmp_path / "groups.csv"
    groups.write_text("case,group\n" + "".join(f"case{i:02d},{'AB'[i % 2]}\n" for i in range(len(SIZES))))
    out = _evaluate(tmp_path, "r", 0, "--groups", str(groups), "--bootstrap-samples", "50", raters=3)
    printed = capsys.readouterr().out
    assert "volume CRPS" in printed and "mm³" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units"]["volume_crps"] == "mm^3"
    assert all(r["volume_crps_unit"] == "mm^3" for r in _csv(out / "summary.csv"))
    assert all(r["volume_crps_unit"] == "mm^3" for r in _csv(out / "per_image.csv"))
    g = _csv(out / "groups.csv")
    assert {r["class_name"] for r in g} == {"background", "liver", "kidney"}
    assert {f"groups_reliability_{n}.{e}" for n in ("background", "liver", "kidney") for e in ("pdf", "png")} <= set(
        os.listdir(out)
    )
    # NumPy labels have no header: the volume CRPS counts voxels, and says so
    out = _evaluate(tmp_path, "v", 0, "--no-figures", raters=2, nifti=False)
    assert json.loads((out / "summary.json").read_text())["units"]["volume_crps"] == "voxels"
    assert "voxels" in capsys.readouterr().out
    # compare carries the unit into the table
    out2 = _evaluate(tmp_path, "r2", 1, "--no-figures", raters=3)
    r1 = _evaluate(tmp_path, "r1", 0, "--no-figures", raters=3)
    assert compare_main([str(r1), str(out2), "--out", str(tmp_path / "cmp"), "--no-figures"]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "volume CRPS (mm³)" in md and "consensus Dice" in md
    assert "mm$^3$" in (tmp_path / "cmp" / "comparison.tex").read_text()


def test_compare_two_evaluate_outputs(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "cmp"
    assert calibops_main(["compare", str(a), str(b), "--names", "base", "new", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == [f"comparison.{e}" for e in ("csv", "md", "pdf", "png", "tex")]
    rows = _csv(out / "comparison.csv")
    runs = {"base": json.loads((a / "summary.json").read_text()), "new": json.loads((b / "summary.json").read_text())}
    per_image = {"base": _csv(a / "per_image.csv"), "new": _csv(b / "per_image.csv")}
    quantities = {r["quantity"] for r in rows}
    assert {"macro_ece", "macro_ace", "macro_mce", "micro_ece", "micro_ace", "micro_mce", "dice"} <= quantities
    assert {r["class_name"] for r in rows} == {"background", "liver", "kidney", "mean over classes"}
    for r in rows:
        srow = next(x for x in runs[r["run"]]["summary"] if x["class_name"] == r["class_name"])
        col = "dice_mean" if r["quantity"] == "dice" else r["quantity"]
        assert float(r["value"]) == pytest.approx(srow[col], rel=1e-5)
        if r["quantity"].startswith("micro"):
            assert r["lower"] == "nan"  # pooled values: no interval
            continue
        lo, hi = float(r["lower"]), float(r["upper"])
        assert lo <= float(r["value"]) <= hi
        if r["class_name"] != "mean over classes":  # the bootstrap resamples the same per-case values
            col = "dice" if r["quantity"] == "dice" else r["quantity"][6:]
            v = [float(x[col]) for x in per_image[r["run"]] if x["class_name"] == r["class_name"]]
            assert np.nanmean(v) == pytest.approx(float(r["value"]), rel=1e-5)
        if r["run"] == "new":
            base = next(
                x
                for x in rows
                if x["run"] == "base" and x["quantity"] == r["quantity"] and x["class_name"] == r["class_name"]
            )
            assert float(r["diff"]) == pytest.approx(float(r["value"]) - float(base["value"]), abs=1e-6)
            assert float(r["diff_lower"]) <= float(r["diff"]) <= float(r["diff_upper"]) and r["paired"] == "True"
    md = (out / "comparison.md").read_text()
    assert md.startswith("| class | quantity | base | new | new − base |") and "[" in md
    assert md in capsys.readouterr().out
    tex = (out / "comparison.tex").read_text()
    assert (
        "\\toprule" in tex and "\\bottomrule" in tex and tex.count("\\\\") == md.count("\n| ") + 1
    )  # header + body rows
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "comparison.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_run_against_itself_differs_by_zero(two_runs):
    a, _ = two_runs
    runs = [load_run(a, "x"), load_run(a, "y")]
    rows = comparison_rows(runs, num_samples=200, seed=3)
    for r in rows:
        if r["run"] == "y":
            assert r["diff"] == 0.0 or math.isnan(r["value"])
            if not math.isnan(r["diff_lower"]):
                assert r["diff_lower"] == r["diff_upper"] == 0.0
    # seeded: the same intervals again
    again = comparison_rows(runs, num_samples=200, seed=3)
    assert [r["lower"] for r in rows] == [r["lower"] for r in again] or all(
        (math.isnan(x) and math.isnan(y)) or x == y
        for x, y in zip([r["lower"] for r in rows], [r["lower"] for r in again])
    )


def test_compare_errors_are_one_line_and_write_nothing(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "cmp"
    assert compare_main([str(a), str(b), "--names", "x", "--out", str(out)]) == 2
    assert compare_main([str(a), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert compare_main([str(a), "--out", str(out)]) == 2
    assert compare_main([str(a), str(b), "--names", "x", "x", "--out", str(out)]) == 2
    other = _evaluate(tmp_path, "two", 5, "--no-figures")  # evaluated without the histogram figure: still an npz
    json_path = other / "summary.json"
    data = json.loads(json_path.read_text())
    data["summary"] = [dict(r, class_name="other " + r["class_name"]) for r in data["summary"]]
    json_path.write_text(json.dumps(data))
    assert compare_main([str(a), str(other), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("calibops compare: error: ") for line in err)
    assert "classes" in err[-1]
    assert not out.exists()
