"""Tests of ``calibops demo``: the synthetic data set, the training loop, and an end-to-end run with few steps.

The end-to-end run uses a handful of steps and small image counts so it takes seconds; the real default run
(its table and timing) is recorded in docs/demo_results.md, not timed here.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from calibops import demo  # noqa: E402

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
    kw = dict(steps=2, seed=5, device=cpu, batch_size=4, progress=False)
    a = demo.train_model(data, None, **kw)
    b = demo.train_model(data, None, **kw)
    hard = demo.train_model(data, "hard", **kw)
    soft = demo.train_model(data, "soft", **kw)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # the mL1-ACE term changes the updates: same seed, same batches, different weights
    assert any(not torch.equal(pa, ph) for pa, ph in zip(a.parameters(), hard.parameters(), strict=True))
    assert any(not torch.equal(ph, ps) for ph, ps in zip(hard.parameters(), soft.parameters(), strict=True))
    assert not a.training  # returned in eval mode


def _read_results(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_end_to_end_writes_finite_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    argv = [
        "--out",
        str(out),
        "--steps",
        "3",
        "--seed",
        "2",
        "--train-images",
        "16",
        "--test-images",
        "8",
        "--threads",
        "1",
    ]
    threads = torch.get_num_threads()
    assert demo.demo_main(argv) == 0
    assert torch.get_num_threads() == threads  # the demo restores the caller's thread count
    rows = _read_results(out / "results.csv")
    assert [r["loss"] for r in rows] == list(demo.CONFIGS)
    assert set(demo.CSV_COLUMNS) <= set(rows[0])
    for row in rows:
        for col in (
            *METRIC_COLUMNS,
            *(f"dsc_{n}" for n in demo.CLASS_NAMES[1:]),
            *(f"ace_{n}" for n in demo.CLASS_NAMES[1:]),
        ):
            value = float(row[col])
            assert math.isfinite(value), (row["loss"], col, row[col])
            assert 0.0 <= value <= 1.0, (row["loss"], col, value)
        assert int(row["steps"]) == 3 and int(row["seed"]) == 2 and row["device"] == "cpu"
        assert float(row["train_seconds"]) > 0
        # macro MCE >= macro ACE per image, so also on average
        assert float(row["mce"]) >= float(row["ace"]) - 1e-6
    assert float(rows[0]["ace_change_pct"]) == 0.0
    for name in demo.CONFIGS:
        png = out / f"demo_{name}.png"
        assert png.stat().st_size > 1000
        assert png.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    for name in demo.CONFIGS:
        assert name in printed
    assert "total time" in printed


def test_demo_is_reproducible(tmp_path: Path) -> None:
    argv = [
        "--steps",
        "2",
        "--seed",
        "7",
        "--train-images",
        "8",
        "--test-images",
        "4",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert demo.demo_main(["--out", str(tmp_path / "a"), *argv]) == 0
    assert demo.demo_main(["--out", str(tmp_path / "b"), *argv]) == 0
    a, b = _read_results(tmp_path / "a" / "results.csv"), _read_results(tmp_path / "b" / "results.csv")
    for ra, rb in zip(a, b, strict=True):
        for col in METRIC_COLUMNS:
            assert ra[col] == rb[col], (ra["loss"], col)


@pytest.mark.parametrize(
    "argv",
    [["--steps", "0"], ["--steps", "x"], ["--seed", "-1"], ["--device", "tpu"], ["--test-images", "0"], ["--bogus"]],
)
def test_demo_rejects_bad_arguments(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert demo.demo_main(["--out", str(tmp_path), *argv]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_run_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps"):
        demo.run_demo(str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="device"):
        demo.run_demo(str(tmp_path), steps=1, device="meta")
    with pytest.raises(ValueError, match="num_test"):
        demo.run_demo(str(tmp_path), steps=1, num_test=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_demo_cuda_without_cuda_fails_clearly(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert demo.demo_main(["--out", str(tmp_path), "--device", "cuda"]) == 2
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
