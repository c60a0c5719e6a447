"""nnU-Net v2 integration: the calibops trainers through nnU-Net's real code, end to end, and their loss.

The end-to-end test writes a tiny synthetic 2D dataset in nnU-Net's raw format, runs nnU-Net's own
``nnUNetv2_plan_and_preprocess``, trains ``calibops nnunet train --binning soft`` on the CPU for a few iterations
(the real trainer, data loader, augmentation, checkpointing and final validation), predicts the test cases with
``calibops nnunet predict --save_probabilities``, evaluates them with ``calibops evaluate`` and checks the numbers
against :class:`calibops.DatasetCalibration` run on the same arrays. No mocks. Skipped only where nnunetv2 is not
installed; CI installs it in its own job (.ci/run) and sets CALIBOPS_TEST_REQUIRE_NNUNET=1, which turns a missing
nnunetv2 into a failure.

The loss tests check the calibration term the trainer adds against calibops' loss computed directly: deep
supervision (full resolution / all outputs with nnU-Net's weights), the ignore label, region-based (sigmoid)
training with and without an ignore label, 3D outputs and float16 logits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("CALIBOPS_TEST_REQUIRE_NNUNET", "0") == "1":  # .ci/run's nnU-Net job: never skip there
    import nibabel as nib
    import nnunetv2  # noqa: F401
else:
    pytest.importorskip("nnunetv2")
    nib = pytest.importorskip("nibabel")

import calibops  # noqa: E402
from calibops import DatasetCalibration, MarginalL1ACELoss  # noqa: E402
from calibops.integrations import nnunet as cn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_CalibTiny"


# ------------------------------------------------------------------------------------------------ the data set
def _case(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a disc (label 1) and a small square (label 2); labels 0/1/2."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(20, 44, 2)
    r = rng.uniform(8, 14)
    label = np.zeros((size, size), np.uint8)
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 1
    sy, sx = rng.integers(4, size - 12, 2)
    label[sy : sy + 7, sx : sx + 7] = 2
    image = np.array([0.0, 1.0, 2.0])[label] + rng.normal(0, 0.6, label.shape)
    return image.astype(np.float32), label


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array[:, :, None], np.eye(4)), str(path))  # (x, y, z = 1): a 2D case


def _write_dataset(raw: Path, n_train: int = 8, n_test: int = 2) -> Path:
    base = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_train + n_test):
        image, label = _case(rng)
        split = "Tr" if i < n_train else "Ts"
        _save(image, base / f"images{split}" / f"case_{i:03d}_0000.nii.gz")
        _save(label, base / f"labels{split}" / f"case_{i:03d}.nii.gz")
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "disc": 1, "square": 2},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
    }
    (base / "dataset.json").write_text(json.dumps(meta))
    return base


def _run(cmd: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _nnunet_command(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} not next to {sys.executable}: nnunetv2's console scripts are missing"
    return str(path)


# ------------------------------------------------------------------------------------------------ end to end
def test_train_predict_evaluate_end_to_end(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    raw, pre, res = tmp_path / "raw", tmp_path / "preprocessed", tmp_path / "results"
    base = _write_dataset(raw)
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(raw),
        nnUNet_preprocessed=str(pre),
        nnUNet_results=str(res),
        nnUNet_def_n_proc="1",  # the final validation's export pool: 1 process is fastest on 2 cores
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.pop("CALIBOPS_BACKEND", None)

    # 1. nnU-Net's planning and preprocessing, as a user runs it
    _run([_nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1",
          "-npfp", "1"], env)  # fmt: skip
    plans_file = pre / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    # a narrower U-Net (a plans edit, as nnU-Net users make them) keeps the CPU run short; same topology
    arch["features_per_stage"] = [min(8 * 2**k, 64) for k in range(len(arch["features_per_stage"]))]
    plans_file.write_text(json.dumps(plans, indent=1))
    t_plan = time.perf_counter()

    # 2. calibops nnunet train: nnU-Net's trainer code with the soft mL1-ACE trainer, a few iterations on the CPU
    cli = [sys.executable, "-m", "calibops"]
    train_env = dict(env, nnUNet_n_proc_DA="0")  # the data augmentation in-process (planning needs it unset)
    _run(cli + ["nnunet", "train", str(DATASET_ID), "2d", "0", "--binning", "soft", "--epochs", "2",
                "--iterations-per-epoch", "3", "--val-iterations-per-epoch", "2", "-device", "cpu"],
         train_env)  # fmt: skip
    t_train = time.perf_counter()
    model = res / DATASET / "nnUNetTrainerSoftL1ACE__nnUNetPlans__2d"
    fold = model / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "progress.png").stat().st_size > 0
    assert (fold / "validation" / "summary.json").is_file()  # nnU-Net's own final validation ran
    options = json.loads((fold / "calibops_trainer.json").read_text())
    assert options["binning"] == "soft" and options["ace_weight"] == 1.0 and options["num_bins"] == 20
    assert options["backend"] == calibops.backend_for(torch.empty(0))
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerSoftL1ACE"
    logged = ckpt["logging"]
    for key in ("val_ece", "val_ace", "val_mce"):
        assert len(logged[key]) == 2 and all(0 <= v <= 1 for v in logged[key]), (key, logged[key])
    assert all(ace <= mce for ace, mce in zip(logged["val_ace"], logged["val_mce"]))
    # the calibration line follows nnU-Net's pseudo-Dice line in its training log, once per epoch
    log = next(fold.glob("training_log_*.txt")).read_text().splitlines()
    dice_lines = [i for i, line in enumerate(log) if "Pseudo dice" in line]
    assert len(dice_lines) == 2
    for i in dice_lines:
        assert "Calibration (validation patches, macro, 20 bins): ECE" in log[i + 1], log[i : i + 2]
    assert any("mL1-ACE (soft binning, 20 bins, softmax, full-resolution output only" in line for line in log)

    # 3. calibops nnunet predict with probabilities
    pred = tmp_path / "pred"
    _run(cli + ["nnunet", "predict", "-i", str(base / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
                "-c", "2d", "-f", "0", "--binning", "soft", "--save_probabilities", "-device", "cpu",
                "-npp", "0", "-nps", "0", "--disable_progress_bar"], env)  # fmt: skip
    t_predict = time.perf_counter()
    cases = sorted(p.name[: -len(".npz")] for p in pred.glob("*.npz"))
    assert cases == ["case_008", "case_009"]

    # 4. calibops evaluate on nnU-Net's output folder
    out = tmp_path / "eval"
    _run(cli + ["evaluate", "--pred", str(pred), "--label", str(base / "labelsTs"), "--out", str(out),
                "--no-figures", "--no-progress"], env)  # fmt: skip
    t_eval = time.perf_counter()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 2

    # the same arrays straight into DatasetCalibration: nnU-Net's (C, z, y, x) probabilities against the labels
    metric = DatasetCalibration(3, 20, include_background=False, to_onehot_y=True)  # evaluate's default
    for case in cases:
        probs = np.load(pred / f"{case}.npz")["probabilities"]  # (3, 1, 64, 64), float32
        assert probs.shape == (3, 1, 64, 64) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
        seg = np.asarray(nib.load(str(pred / f"{case}.nii.gz")).dataobj)  # (x, y, z)
        np.testing.assert_array_equal(probs.argmax(0), seg.transpose(2, 1, 0))  # argmax = nnU-Net's segmentation
        label = np.asarray(nib.load(str(base / "labelsTs" / f"{case}.nii.gz")).dataobj).transpose(2, 1, 0)
        metric.update(torch.from_numpy(probs)[None], torch.from_numpy(label.astype(np.int64))[None, None])
    r = metric.compute()
    rows = {row["class"]: row for row in summary["summary"]}
    for k, c in enumerate(r.classes):
        for kind in ("macro", "micro"):
            for m in ("ece", "ace", "mce"):
                want = float(getattr(getattr(r, kind), m)[k])
                got = rows[c][f"{kind}_{m}"]
                assert not math.isnan(want)
                assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (c, kind, m)
    print(
        f"\nnnU-Net end to end: plan+preprocess {t_plan - t0:.1f} s, train {t_train - t_plan:.1f} s, "
        f"predict {t_predict - t_train:.1f} s, evaluate {t_eval - t_predict:.1f} s, total {t_eval - t0:.1f} s"
    )


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    from calibops.integrations.nnunet_cli import main

    env = {k: os.environ.get(k) for k in ("nnUNet_preprocessed", "nnUNet_results")}
    try:
        os.environ.pop("nnUNet_preprocessed", None)
        os.environ.pop("nnUNet_results", None)
        assert main(["train", "1", "2d", "0", "--binning", "soft", "-device", "cpu"]) == 2
        os.environ["nnUNet_preprocessed"] = str(tmp_path)
        os.environ["nnUNet_results"] = str(tmp_path)
        assert main(["train", "1", "2d", "0", "-device", "cpu"]) == 2  # --binning missing
        assert main(["train", "1", "2d", "x", "--binning", "hard", "-device", "cpu"]) == 2  # bad fold
        assert main(["train", "1", "2d", "0", "--binning", "hard", "--ace-weight", "-1", "-device", "cpu"]) == 2
        no_model = ["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-d", "Dataset001_X", "-c", "2d"]
        assert main(no_model + ["--binning", "hard", "-device", "cpu"]) == 2
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_trainer_names() -> None:
    assert cn.trainer_name("hard") == "nnUNetTrainerHardL1ACE"
    assert cn.trainer_name("soft", 0.5, 15, "all") == "nnUNetTrainerSoftL1ACE_w0p5_M15_dsall"
    assert cn.trainer_class("soft") is cn.nnUNetTrainerSoftL1ACE
    cls = cn.trainer_class("hard", ace_weight=2.0)
    assert cls.__name__ == "nnUNetTrainerHardL1ACE_w2" and issubclass(cls, cn.nnUNetTrainerHardL1ACE)
    assert cls.ace_weight == 2.0 and cls.binning == "hard"
    with pytest.raises(ValueError, match="binning"):
        cn.trainer_name("medium")
    with pytest.raises(ValueError, match="ace_deep_supervision"):
        cn.trainer_class("hard", ace_deep_supervision="low")


# ------------------------------------------------------------------------------------------------ the loss
def _nnunet_base(ds_weights=None, ignore_label=None, regions=False):
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    if regions:
        base = DC_and_BCE_loss(
            {}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
            use_ignore_label=ignore_label is not None, dice_class=MemoryEfficientSoftDiceLoss,
        )  # fmt: skip
    else:
        base = DC_and_CE_loss(
            {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
            ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss,
        )  # fmt: skip
    return DeepSupervisionWrapper(base, ds_weights) if ds_weights is not None else base


def _ace(binning="hard", **kw):
    return cn._PairL1ACELoss(num_bins=20, binning=binning, backend="auto", **kw)


@pytest.mark.parametrize("binning", ["hard", "soft"])
@pytest.mark.parametrize("mode", ["full", "all"])
def test_loss_deep_supervision_labels(binning: str, mode: str) -> None:
    g = torch.Generator().manual_seed(1)
    weights = np.array([1, 0.5, 0.25, 0.0]) / 1.75  # nnU-Net's: 1/2^k, lowest 0, normalised
    shapes = [(2, 3, 16, 16), (2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2)]
    outs = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    tgts = [torch.randint(0, 3, (s[0], 1, *s[2:]), generator=g).to(torch.int16) for s in shapes]
    ace = _ace(binning, to_onehot_y=True, softmax=True)
    loss = cn.CalibratedLoss(_nnunet_base(weights), ace, 0.7, ds_weights=weights, deep_supervision=mode)
    got = loss(outs, tgts)
    ref_ace = MarginalL1ACELoss(to_onehot_y=True, softmax=True, binning=binning, backend="reference")
    if mode == "full":
        term = ref_ace(outs[0], tgts[0].long())
    else:
        term = sum(w * ref_ace(o, t.long()) for w, o, t in zip(weights, outs, tgts) if w != 0)
    want = _nnunet_base(weights)(outs, tgts) + 0.7 * term
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.last_terms["ace"], term.detach(), rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, outs[0])
    (g_want,) = torch.autograd.grad(want, outs[0])
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_loss_ignore_label_3d_and_half() -> None:
    g = torch.Generator().manual_seed(2)
    out = torch.randn(2, 3, 6, 7, 5, generator=g)
    tgt = torch.randint(0, 4, (2, 1, 6, 7, 5), generator=g).to(torch.int16)  # 3 = the ignore label
    loss = cn.CalibratedLoss(_nnunet_base(ignore_label=3), _ace(to_onehot_y=True, softmax=True, ignore_index=3), 1.0,
                             ignore_label=3)  # fmt: skip
    loss(out, tgt)
    # the ignored voxels are left out: the same loss on the kept voxels only, one image at a time
    ref = MarginalL1ACELoss(to_onehot_y=True, softmax=True, reduction="none", backend="reference")
    rows = []
    for b in range(2):
        keep = (tgt[b, 0] != 3).reshape(-1)
        rows.append(ref(out[b].reshape(3, -1)[:, keep][None], tgt[b].reshape(1, -1)[:, keep][None].long()))
    torch.testing.assert_close(loss.last_terms["ace"], torch.cat(rows).mean(), rtol=1e-5, atol=1e-6)
    # float16 logits (nnU-Net's CUDA autocast) give the float32 result to half precision
    loss(out.half(), tgt)
    torch.testing.assert_close(loss.last_terms["ace"], torch.cat(rows).mean(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("binning", ["hard", "soft"])
def test_loss_regions(binning: str) -> None:
    g = torch.Generator().manual_seed(3)
    out = torch.randn(2, 2, 12, 10, generator=g, requires_grad=True)  # 2 overlapping regions
    lab = torch.randint(0, 3, (2, 1, 12, 10), generator=g)
    regions = torch.cat([lab >= 1, lab == 2], dim=1)  # nnU-Net's bool region targets
    ref = MarginalL1ACELoss(sigmoid=True, binning=binning, reduction="none", backend="reference")

    plain = cn.CalibratedLoss(_nnunet_base(regions=True), _ace(binning, sigmoid=True), 1.0, regions=True)
    plain(out, regions)
    torch.testing.assert_close(plain.last_terms["ace"], ref(out, regions.float()).mean(), rtol=1e-5, atol=1e-6)

    # with an ignore label nnU-Net appends the ignore mask as the last target channel
    ignore = torch.rand(2, 1, 12, 10, generator=g) < 0.3
    target = torch.cat([regions, ignore], dim=1)
    masked = cn.CalibratedLoss(_nnunet_base(ignore_label=9, regions=True), _ace(binning, sigmoid=True), 1.0,
                               regions=True, ignore_label=9)  # fmt: skip
    masked(out, target)
    rows = []
    for b in range(2):
        keep = (~ignore[b, 0]).reshape(-1)
        rows.append(ref(out[b].reshape(2, -1)[:, keep][None], regions[b].reshape(2, -1)[:, keep][None].float()))
    want = torch.cat(rows).mean()
    torch.testing.assert_close(masked.last_terms["ace"], want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(masked.calibration_term(out, target), out)
    (g_want,) = torch.autograd.grad(want, out)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def _macro_means(metric: DatasetCalibration) -> tuple[float, ...]:
    r = metric.compute().macro
    return tuple(float(getattr(r, f)[~getattr(r, f).isnan()].mean()) for f in ("ece", "ace", "mce"))


def test_validation_calibration_labels_and_regions() -> None:
    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 3, 9, 8, generator=g)
    lab = torch.randint(0, 4, (3, 1, 9, 8), generator=g).to(torch.int16)  # 3 = ignore label

    vc = cn._ValidationCalibration(20, regions=False, ignore_label=3)
    vc.update(out[:2], lab[:2])
    vc.update(out[2:], lab[2:])
    ref = DatasetCalibration(3, 20, include_background=False, to_onehot_y=True, softmax=True, ignore_index=3)
    ref.update(out, lab.long())
    assert vc.compute() == pytest.approx(_macro_means(ref), rel=1e-5)

    regions = torch.cat([lab >= 1, lab == 2], dim=1)
    vc = cn._ValidationCalibration(20, regions=True, ignore_label=None)
    vc.update(out[:, :2], regions)
    ref = DatasetCalibration(2, 20, include_background=True, sigmoid=True, backend="reference")
    ref.update(out[:, :2], regions.float())
    assert vc.compute() == pytest.approx(_macro_means(ref), rel=1e-5)

    # regions with an ignore label: per region and image, only the kept voxels count
    ignore = lab == 3
    vc = cn._ValidationCalibration(20, regions=True, ignore_label=3)
    vc.update(out[:, :2], torch.cat([regions, ignore], dim=1))
    ref = DatasetCalibration(2, 20, include_background=True, sigmoid=True, backend="reference")
    for b in range(3):
        keep = (~ignore[b, 0]).reshape(-1)
        ref.update(out[b, :2].reshape(2, -1)[:, keep][None], regions[b].reshape(2, -1)[:, keep][None].float())
    assert vc.compute() == pytest.approx(_macro_means(ref), rel=1e-5)
    assert all(math.isnan(v) for v in cn._ValidationCalibration(20, False, None).compute())  # no patch: NaN


def test_logger_restores_old_checkpoints() -> None:
    log = cn.CalibrationLocalLogger()
    old = {k: [1.0, 2.0] for k in ("mean_fg_dice", "ema_fg_dice", "train_losses", "val_losses", "lrs")}
    old.update(dice_per_class_or_region=[[1.0], [2.0]], epoch_start_timestamps=[0, 1], epoch_end_timestamps=[1, 2])
    log.load_checkpoint(old)  # a plain nnUNetTrainer checkpoint: no calibration values yet
    assert all(math.isnan(v) for v in log.get_value("val_ece", None)) and len(log.get_value("val_mce", None)) == 2
    log.log("val_ace", 0.1, 2)
    assert log.get_value("val_ace", 2) == 0.1


def test_install_trainers_is_found_by_nnunet_and_uninstalls(tmp_path: Path, capsys) -> None:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from calibops.integrations import nnunet_cli

    path = Path(nnunet_cli.shim_path())
    had = path.read_text() if path.exists() else None
    try:
        path.unlink(missing_ok=True)
        assert nnunet_cli.main(["install-trainers"]) == 0
        assert "calibops nnunet uninstall" in capsys.readouterr().out
        # nnU-Net's own lookup by name (what nnUNetv2_train -tr / nnUNetv2_predict -tr use) finds calibops' classes
        assert recursive_find_trainer_class_by_name("nnUNetTrainerSoftL1ACE") is cn.nnUNetTrainerSoftL1ACE
        assert recursive_find_trainer_class_by_name("nnUNetTrainerHardL1ACE") is cn.nnUNetTrainerHardL1ACE
        assert nnunet_cli.main(["install-trainers"]) == 0  # again: rewrites its own file
        assert nnunet_cli.main(["uninstall"]) == 0
        assert not path.exists()
        assert not any(p.name.startswith("calibops_trainers.") for p in (path.parent / "__pycache__").glob("*"))
        assert nnunet_cli.main(["uninstall"]) == 0  # nothing left: says so
        # a file calibops did not write is neither overwritten nor removed
        path.write_text("# someone else's trainers\n")
        assert nnunet_cli.main(["install-trainers"]) == 2
        assert nnunet_cli.main(["uninstall"]) == 2
        assert path.read_text() == "# someone else's trainers\n"
        assert "not written by calibops" in capsys.readouterr().err
    finally:
        path.unlink(missing_ok=True)
        if had is not None:
            path.write_text(had)
