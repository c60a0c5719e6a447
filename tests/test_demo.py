"""Tests of ``calibops demo``: the synthetic data set, the training loop, the spread summary, and end-to-end runs
of ``--quick`` and of a few steps.

The end-to-end runs take seconds; the real default run (its tables, spread and timing) is recorded in
docs/demo_results.md, not timed here.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from calibops import demo  # noqa: E402
from calibops.demo._cli import demo_main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_COLUMNS = ("dsc", "ace", "mce", "ece", "micro_ace", "micro_mce")


def test_dataset_is_deterministic_and_well_formed() -> None:
    a = demo.make_dataset(24, seed=3)
    b = demo.make_dataset(24, seed=3)
    c = demo.make_dataset(24, seed=4)
    assert a.images.shape == (24, 1, demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert a.labels.shape == (24, demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    assert a.images.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert torch.isfinite(a.images).all()
    assert int(a.labels.min()) >= 0 and int(a.labels.max()) < demo.NUM_CLASSES
    freq = torch.bincount(a.labels.flatten(), minlength=demo.NUM_CLASSES).double() / a.labels.numel()
    # every class occurs, and the classes are imbalanced: background dominates, spots are rare
    assert (freq > 0).all()
    assert freq[0] > 0.5 and freq[3] < 0.05 and freq[1] > freq[2] > freq[3]
    # the spots class is absent from some images (the rare class) and present in others
    has_spots = (a.labels == 3).flatten(1).any(1)
    assert 0 < int(has_spots.sum()) < 24


def test_labels_differ_from_visible_outlines() -> None:
    """The label boundaries are perturbed relative to the image: a perfect segmentation is impossible, so a
    calibrated network has to be uncertain near boundaries. Check that the image intensity alone does not
    separate organ from background pixels (their intensity ranges overlap)."""
    d = demo.make_dataset(16, seed=0)
    img, lab = d.images[:, 0], d.labels
    bg, organ = img[lab == 0], img[lab == 1]
    assert bg.max() > organ.min()


def test_make_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_images"):
        demo.make_dataset(0, seed=0)
    with pytest.raises(ValueError, match="size"):
        demo.make_dataset(4, seed=0, size=8)


def test_network_shapes_and_dice_ce() -> None:
    net = demo.TinyUNet(width=4)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (2, demo.NUM_CLASSES, 32, 32)
    labels = torch.randint(0, demo.NUM_CLASSES, (2, 32, 32))
    dice, ce = demo.dice_ce_loss(logits, labels)
    assert dice.ndim == 0 and ce.ndim == 0
    assert 0.0 <= float(dice) <= 1.0
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, labels))
    # a perfect, confident prediction has ~zero Dice loss and ~zero cross-entropy
    perfect = 50.0 * torch.nn.functional.one_hot(labels, demo.NUM_CLASSES).movedim(-1, 1).float()
    dice0, ce0 = demo.dice_ce_loss(perfect, labels)
    assert float(dice0) < 1e-4 and float(ce0) < 1e-4


def test_training_is_deterministic_and_uses_the_ace_term() -> None:
    data = demo.make_dataset(8, seed=1)
    cpu = torch.device("cpu")
    recipe = demo.Recipe(steps=2, batch_size=4, width=4)
    losses: list[float] = []
    a = demo.train_model(data, None, recipe, seed=5, device=cpu, report=losses.append)
    b = demo.train_model(data, None, recipe, seed=5, device=cpu)
    hard = demo.train_model(data, "hard", recipe, seed=5, device=cpu)
    soft = demo.train_model(data, "soft", recipe, seed=5, device=cpu)
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)  # one report per step
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # the mL1-ACE term changes the updates: same seed, same batches, different weights
    assert any(not torch.equal(pa, ph) for pa, ph in zip(a.parameters(), hard.parameters(), strict=True))
    assert any(not torch.equal(ph, ps) for ph, ps in zip(hard.parameters(), soft.parameters(), strict=True))
    assert not a.training  # returned in eval mode


@pytest.mark.parametrize("binning", [None, "hard", "soft"])
def test_shared_start_then_train_equals_training_from_step_zero(binning: str | None) -> None:
    """The demo trains the shared Dice + CE steps once per seed and continues the three configurations from that
    checkpoint: the result must be bit-identical to one uninterrupted training (weights, BatchNorm buffers)."""
    data = demo.make_dataset(12, seed=2)
    cpu = torch.device("cpu")
    recipe = demo.Recipe(steps=6, batch_size=4, width=4, ace_start=0.5)
    assert recipe.shared_steps == 3
    reports: list[float] = []
    start = demo.shared_start(data, recipe, seed=7, device=cpu, report=reports.append)
    assert start.step == 3 and len(reports) == 3
    resumed = demo.train_model(data, binning, recipe, seed=7, device=cpu, report=reports.append, start=start)
    assert len(reports) == 6  # the continuation reports only the steps it trains
    whole = demo.train_model(data, binning, recipe, seed=7, device=cpu)
    for (ka, va), (kb, vb) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    # the shared steps are Dice + CE for every configuration: the checkpoint does not depend on the binning,
    # and the calibration term acts only after it (different weights at the end)
    if binning is not None:
        base = demo.train_model(data, None, recipe, seed=7, device=cpu, start=start)
        assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), resumed.parameters(), strict=True))


def test_shared_steps_follow_ace_start() -> None:
    assert demo.Recipe(steps=600, ace_start=2 / 3).shared_steps == 400
    assert demo.Recipe(steps=600, ace_start=0.0).shared_steps == 0
    assert demo.Recipe(steps=1, ace_start=0.9).shared_steps == 0  # the calibration term keeps at least one step
    assert demo.DEFAULT_RECIPE.shared_steps < demo.DEFAULT_RECIPE.steps
    data = demo.make_dataset(8, seed=0)
    start = demo.shared_start(data, demo.Recipe(steps=4, batch_size=2, width=4, ace_start=0.5), 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="start"):
        demo.train_model(
            data, "hard", demo.Recipe(steps=6, batch_size=2, width=4, ace_start=0.5), 0, "cpu", start=start
        )


def test_training_loss_is_equal_thirds() -> None:
    logits = torch.randn(2, demo.NUM_CLASSES, 16, 16)
    labels = torch.randint(0, demo.NUM_CLASSES, (2, 16, 16))
    dice, ce = demo.dice_ce_loss(logits, labels)
    torch.testing.assert_close(demo.training_loss(logits, labels, None), (dice + ce) / 3)
    ace = demo.ace_loss("soft")
    torch.testing.assert_close(demo.training_loss(logits, labels, ace), (dice + ce + ace(logits, labels)) / 3)


def test_recipe_learning_rate_is_one_cycle() -> None:
    r = demo.Recipe(steps=100, warmup=0.1)
    factors = [r.lr_factor(s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(x < y for x, y in zip(factors[:10], factors[1:10]))
    assert all(x >= y for x, y in zip(factors[9:], factors[10:]))  # then a cosine decay towards 0
    assert factors[-1] < 0.001


def _rows(seed: int, base: tuple, hard: tuple, soft: tuple) -> list[dict]:
    rows = []
    for name, (dsc, ace, mce) in zip(demo.CONFIGS, (base, hard, soft)):
        row = {"seed": seed, "loss": name, "dsc": dsc, "ace": ace, "mce": mce}
        for k in ("dsc", "ace", "mce"):
            row[f"{k}_change_pct"] = 100.0 * (row[k] / base[("dsc", "ace", "mce").index(k)] - 1.0)
        rows.append(row)
    return rows


def test_spread_summarises_the_seeds() -> None:
    from calibops.demo._report import format_spread, spread

    rows = [
        *_rows(0, (0.80, 0.20, 0.50), (0.805, 0.18, 0.45), (0.78, 0.15, 0.40)),  # every finding holds
        *_rows(1, (0.70, 0.20, 0.50), (0.68, 0.21, 0.40), (0.60, 0.19, 0.45)),  # none holds
    ]
    summary = spread(rows, demo.CONFIGS)
    mean, lo, hi = summary["changes"]["dice_ce_hard_ace"]["ace_change_pct"]
    assert (lo, hi) == pytest.approx((-10.0, 5.0)) and mean == pytest.approx(-2.5)
    mean, lo, hi = summary["changes"]["dice_ce_soft_ace"]["dsc_change_pct"]
    assert (lo, hi) == pytest.approx((100 * (0.6 / 0.7 - 1), 100 * (0.78 / 0.8 - 1)))
    assert summary["holds"] == {
        "ACE soft < hard < Dice+CE": (1, 2),
        "MCE soft < hard < Dice+CE": (1, 2),
        "hard DSC within 0.01 of Dice+CE": (1, 2),
        "soft DSC within 0.03 of Dice+CE": (1, 2),
    }
    text = format_spread(summary, [0, 1])
    assert "spread over 2 seed(s) (0, 1)" in text and "-2.5 [-10.0, +5.0]" in text


def _read_results(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _spread_line(printed: str, name: str) -> list[tuple[float, float, float]]:
    """The (mean, min, max) triples of one configuration's line in the printed spread table."""
    section = printed[printed.index("spread over") :]
    line = next(ln for ln in section.splitlines() if ln.startswith(name + " "))
    triples = re.findall(r"([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]", line)
    return [tuple(float(v) for v in t) for t in triples]


def test_demo_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--quick`` (3 seeds, the default worker processes): files written, finite numbers, the printed spread
    agrees with the CSV, and one training at a time in this process gives the same numbers."""
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert demo_main(["--quick", "--out", str(out), "--seed", "2", "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo restores the caller's thread count
    rows = _read_results(out / "results.csv")
    assert list(rows[0]) == list(demo.CSV_COLUMNS)
    assert [(int(r["seed"]), r["loss"]) for r in rows] == [(s, n) for s in (2, 3, 4) for n in demo.CONFIGS]
    for row in rows:
        for col in (
            *METRIC_COLUMNS,
            *(f"dsc_{n}" for n in demo.CLASS_NAMES[1:]),
            *(f"ace_{n}" for n in demo.CLASS_NAMES[1:]),
        ):
            value = float(row[col])
            assert math.isfinite(value), (row["loss"], col, row[col])
            assert 0.0 <= value <= 1.0, (row["loss"], col, value)
        assert int(row["steps"]) == demo.QUICK_RECIPE.steps and row["device"] == "cpu"
        assert int(row["shared_steps"]) == demo.QUICK_RECIPE.shared_steps > 0
        assert float(row["shared_seconds"]) > 0
        assert float(row["train_seconds"]) > 0
        assert float(row["mce"]) >= float(row["ace"]) - 1e-6  # per image MCE >= ACE, so also on average
    for seed in (2, 3, 4):
        base, *others = [r for r in rows if int(r["seed"]) == seed]
        assert float(base["ace_change_pct"]) == 0.0
        for r in others:
            assert float(r["dsc_change_pct"]) == pytest.approx(
                100 * (float(r["dsc"]) / float(base["dsc"]) - 1), abs=1e-3
            )
    for name in demo.CONFIGS:
        png = out / f"demo_{name}.png"
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert (out / f"demo_{name}.pdf").read_bytes()[:5] == b"%PDF-"
        assert {"summary.json", "per_image.csv", "dataset_histogram.npz"} <= {
            p.name for p in (out / "runs" / name).iterdir()
        }
    # the comparison of the three configurations (calibops compare), the first seed's test images
    for ext in ("md", "tex", "csv", "pdf", "png"):
        assert (out / f"comparison.{ext}").stat().st_size > 100
    with open(out / "comparison.csv", newline="") as fh:
        comp = list(csv.DictReader(fh))
    for r in rows[:3]:  # the seed-2 rows: the comparison's macro ACE and Dice are the demo's numbers
        ace = next(
            c
            for c in comp
            if c["run"] == r["loss"] and c["class_name"] == "mean over classes" and c["quantity"] == "macro_ace"
        )
        assert float(ace["value"]) == pytest.approx(float(r["ace"]), rel=1e-4)
        dice = next(
            c
            for c in comp
            if c["run"] == r["loss"] and c["class_name"] == "mean over classes" and c["quantity"] == "dice"
        )
        assert float(dice["value"]) == pytest.approx(float(r["dsc"]), rel=1e-4)
    # the numbers do not depend on --jobs: the first seed again, in this process, gives bit-identical rows
    again = tmp_path / "again"
    assert demo_main(["--quick", "--out", str(again), "--seed", "2", "--num-seeds", "1", "--jobs", "1"]) == 0
    for ra, rb in zip(rows[:3], _read_results(again / "results.csv"), strict=True):
        for col in ("seed", "loss", *METRIC_COLUMNS):
            assert ra[col] == rb[col], (ra["loss"], col)
    # --ace-start 0: no shared steps, the calibration term from the first step (the papers' protocol)
    scratch = tmp_path / "scratch"
    argv = ["--quick", "--out", str(scratch), "--num-seeds", "1", "--ace-start", "0", "--no-progress"]
    assert demo_main(argv) == 0
    assert {int(r["shared_steps"]) for r in _read_results(scratch / "results.csv")} == {0}
    printed = capsys.readouterr().out
    printed = printed[: printed.index("total time") + 10]  # the 3-seed run's output
    assert printed.count("\nseed ") == 3
    assert "spread over 3 seed(s) (2, 3, 4)" in printed and "the papers' findings" in printed
    for name in list(demo.CONFIGS)[1:]:
        triples = _spread_line(printed, name)
        assert len(triples) == 3
        for (mean, lo, hi), key in zip(triples, ("dsc_change_pct", "ace_change_pct", "mce_change_pct")):
            values = [float(r[key]) for r in rows if r["loss"] == name]
            assert lo <= mean <= hi
            assert (mean, lo, hi) == pytest.approx((sum(values) / 3, min(values), max(values)), abs=0.051)


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "0"],
        ["--steps", "x"],
        ["--seed", "-1"],
        ["--device", "tpu"],
        ["--test-images", "0"],
        ["--num-seeds", "0"],
        ["--jobs", "0"],
        ["--ace-start", "1"],
        ["--ace-start", "-0.1"],
        ["--bogus"],
    ],
)
def test_demo_rejects_bad_arguments(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert demo_main(["--out", str(tmp_path), *argv]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_run_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    tiny = demo.Recipe(steps=1)
    with pytest.raises(ValueError, match="steps"):
        demo.run_demo(str(tmp_path), recipe=demo.Recipe(steps=0))
    with pytest.raises(TypeError, match="recipe"):
        demo.run_demo(str(tmp_path), recipe={"steps": 1})
    with pytest.raises(ValueError, match="device"):
        demo.run_demo(str(tmp_path), recipe=tiny, device="meta")
    with pytest.raises(ValueError, match="num_test"):
        demo.run_demo(str(tmp_path), recipe=demo.Recipe(steps=1, num_test=0))
    with pytest.raises(ValueError, match="ace_start"):
        demo.run_demo(str(tmp_path), recipe=demo.Recipe(steps=2, ace_start=1.0))
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(str(tmp_path), seeds=[], recipe=tiny)
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(str(tmp_path), seeds=[1, 1], recipe=tiny)
    with pytest.raises(ValueError, match="jobs"):
        demo.run_demo(str(tmp_path), recipe=tiny, jobs=0)
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_demo_cuda_without_cuda_fails_clearly(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert demo_main(["--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_python_m_calibops_demo_dispatches() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "calibops", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "--steps" in proc.stdout and "--seed" in proc.stdout and "--device" in proc.stdout
