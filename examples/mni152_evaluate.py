"""Calibration of real anatomy, offline: ``calibops evaluate`` on the MNI152 2009 template's tissue maps.

    pip install "calibops[examples]"                       # nilearn (its wheel ships the template), nibabel, matplotlib
    python examples/mni152_evaluate.py --out mni152_out      # 2 mm, 6 cases, 3 raters (about 1.1 M voxels a case)
    python examples/mni152_evaluate.py --out mni152_1mm --resolution 1 --cases 2   # 1 mm: 8.7 M voxels a case

No download: nilearn's wheel carries the ICBM 2009 (MNI152) grey- and white-matter probability maps and the brain
mask (``nilearn.datasets.load_mni152_gm_template`` / ``_wm_template`` / ``load_mni152_brain_mask``). This script

1. makes the tissue probabilities of four classes — background, CSF, grey matter (GM), white matter (WM) — with
   CSF = brain mask − GM − WM (inside the mask; background outside), renormalised to sum to 1 per voxel;
2. writes an nnU-Net-layout folder (what ``nnUNetv2_predict --save_probabilities`` writes): per case
   ``predictions/case.npz`` (key ``probabilities``, (C, z, y, x)) with the segmentation ``case.nii.gz`` next to it,
   and three raters' label maps ``labelsTs_rater{1,2,3}/case.nii.gz``. A case's prediction is the template's
   probabilities at a temperature (``softmax(log p / T)``: T < 1 sharpens them, an over-confident model; T > 1
   softens them); each rater's labels are the argmax of the template's log-probabilities plus a smooth random field,
   shifted by one voxel in a rater-specific direction (raters disagree at tissue boundaries, as real ones do).
   ``groups.csv`` puts the sharpened cases in group ``sharpened`` and the others in ``softened``;
3. runs ``calibops evaluate`` twice on it — marginal per class, and ``--mode top_label`` — with the three raters and
   the groups, and prints what it reports: per class macro and micro ECE/ACE/MCE over the cases (mean over raters),
   the volume CRPS in mm³ (the voxel size comes from the NIfTI header), the consensus Dice, and the largest
   between-group gap with its bootstrap interval; the figures are in ``<out>/eval_marginal`` and
   ``<out>/eval_top_label``, and ``<out>/anatomy.pdf/.png`` shows one slice of a case and its raters.

The expected output of the default run is ``examples/mni152_evaluate_expected.txt`` (the numbers are deterministic:
seeded; timings and load vary).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASS_NAMES = ("background", "CSF", "GM", "WM")
TEMPERATURES = (0.5, 1.6, 0.8, 1.25, 0.65, 2.0, 0.9, 1.4)  # per case, cycled: sharpened (< 1), softened (> 1) alternate
RATER_SHIFTS = ((1, 0, 0), (0, -1, 0), (0, 0, 1))  # voxels, per rater (at 2 mm; doubled at 1 mm)


def tissue_probabilities(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (4, x, y, z) float32, affine)`` of background, CSF, GM, WM from nilearn's bundled template."""
    try:
        from nilearn import datasets
    except ImportError as exc:
        raise SystemExit(
            "this example needs nilearn: pip install 'calibops[examples]' (or pip install nilearn)"
        ) from exc

    gm_img = datasets.load_mni152_gm_template(resolution=resolution)
    gm = gm_img.get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata(dtype=np.float32) > 0
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    tissue = np.minimum(gm + wm, 1.0)
    csf = np.where(mask, 1.0 - tissue, 0.0)  # CSF = brain mask - GM - WM
    background = np.where(mask, 0.0, 1.0 - tissue)
    p = np.stack([background, csf, gm, wm]).astype(np.float64)
    p /= p.sum(0, keepdims=True)
    return p.astype(np.float32), gm_img.affine


def at_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` over the class axis, float32 (p = 0 stays 0)."""
    logp = np.log(np.maximum(p.astype(np.float64), 1e-12)) / temperature
    logp -= logp.max(0, keepdims=True)
    q = np.exp(logp)
    q /= q.sum(0, keepdims=True)
    return q.astype(np.float32)


def rater_labels(p: np.ndarray, rng: np.random.Generator, shift: tuple[int, ...], scale: int) -> np.ndarray:
    """One rater's label map (x, y, z) int16: argmax of log p plus a smooth random field, shifted by ``shift``."""
    from scipy.ndimage import gaussian_filter

    noise = rng.normal(size=p.shape).astype(np.float32)
    for c in range(p.shape[0]):
        noise[c] = gaussian_filter(noise[c], sigma=1.5 * scale)
    noise *= 0.8 / max(float(noise.std()), 1e-12)  # boundaries move, certain tissue stays
    logits = np.log(np.maximum(p, 1e-6)) + noise
    logits = np.roll(logits, [s * scale for s in shift], axis=(1, 2, 3))
    return logits.argmax(0).astype(np.int16)


def build_folder(root: Path, resolution: int, cases: int, seed: int = 0) -> tuple[Path, list[Path], Path]:
    """Write the nnU-Net-layout folder; returns ``(predictions, rater folders, groups.csv)``."""
    import nibabel as nib

    p, affine = tissue_probabilities(resolution)
    scale = 2 // resolution
    pred_dir = root / "predictions"
    rater_dirs = [root / f"labelsTs_rater{r + 1}" for r in range(len(RATER_SHIFTS))]
    for d in (pred_dir, *rater_dirs):
        d.mkdir(parents=True, exist_ok=True)
    rows = ["case,group"]
    for i in range(cases):
        name = f"mni152_{i:03d}"
        t = TEMPERATURES[i % len(TEMPERATURES)]
        q = at_temperature(p, t)
        # nnU-Net: probabilities (C, z, y, x) in the .npz, the segmentation (x, y, z) with the affine next to it
        np.savez_compressed(pred_dir / f"{name}.npz", probabilities=np.ascontiguousarray(q.transpose(0, 3, 2, 1)))
        nib.save(nib.Nifti1Image(q.argmax(0).astype(np.int16), affine), pred_dir / f"{name}.nii.gz")
        rng = np.random.default_rng([seed, i])
        for d, shift in zip(rater_dirs, RATER_SHIFTS, strict=True):
            nib.save(nib.Nifti1Image(rater_labels(p, rng, shift, scale), affine), d / f"{name}.nii.gz")
        rows.append(f"{name},{'sharpened' if t < 1 else 'softened'}")
    groups = root / "groups.csv"
    groups.write_text("\n".join(rows) + "\n")
    return pred_dir, rater_dirs, groups


def anatomy_figure(root: Path, out: Path) -> None:
    """One axial slice of the first case: the prediction's GM probability and the three raters' label maps."""
    import nibabel as nib

    from calibops.plot import DOUBLE_COLUMN, LABEL_PT, SMALL_PT, _finish, _new_figure, save_figure

    q = np.load(root / "predictions" / "mni152_000.npz")["probabilities"].transpose(0, 3, 2, 1)  # (C, x, y, z)
    z = q.shape[3] // 2 + q.shape[3] // 10
    labels = [nib.load(d / "mni152_000.nii.gz").get_fdata()[:, :, z] for d in sorted(root.glob("labelsTs_rater*"))]
    fig = _new_figure(DOUBLE_COLUMN, 2.3)
    axes = fig.subplots(1, 1 + len(labels))
    im = axes[0].imshow(q[2, :, :, z].T, origin="lower", cmap="viridis", vmin=0, vmax=1)
    axes[0].set_title("prediction: P(GM)", fontsize=LABEL_PT)
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tissue = ListedColormap(["#000000", "#56B4E9", "#E69F00", "#F0E442"])  # Okabe-Ito: bg, CSF, GM, WM
    for k, (ax, lab) in enumerate(zip(axes[1:], labels, strict=True)):
        ax.imshow(lab.T, origin="lower", cmap=tissue, vmin=-0.5, vmax=3.5, interpolation="nearest")
        ax.set_title(f"rater {k + 1}", fontsize=LABEL_PT)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    cbar = fig.colorbar(im, ax=axes[0], shrink=0.8, pad=0.02)
    cbar.ax.tick_params(labelsize=SMALL_PT)
    handles = [Patch(color=tissue(c), label=n) for c, n in enumerate(CLASS_NAMES)]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=SMALL_PT, frameon=False)
    save_figure(_finish(fig), out)


def run_evaluate(argv: list[str]) -> tuple[str, float, float]:
    """``python -m calibops evaluate ARGV``; returns (its output, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "calibops", "evaluate", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"calibops evaluate failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout, wall, cpu


def main(argv: list[str] | None = None) -> int:
    """Build the folder, evaluate it twice, print the reports and the times."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="mni152_out", help="output directory (default: %(default)s)")
    ap.add_argument("--resolution", type=int, choices=(1, 2), default=2, help="voxel size in mm (default: 2)")
    ap.add_argument("--cases", type=int, default=6, help="cases (default: 6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the raters' noise and the bootstrap (default: 0)")
    args = ap.parse_args(argv)
    if args.cases < 2:
        ap.error("--cases must be >= 2 (the groups and the bootstrap need several cases)")
    out = Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    pred, raters, groups = build_folder(out / "nnunet", args.resolution, args.cases, args.seed)
    print(
        f"built {out / 'nnunet'}: {args.cases} cases at {args.resolution} mm, {len(raters)} raters, classes "
        f"{', '.join(CLASS_NAMES)} ({time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU)"
    )
    anatomy_figure(out / "nnunet", out / "anatomy")
    common = ["--pred", str(pred), *(a for r in raters for a in ("--label", str(r))), "--groups", str(groups)]
    common += ["--class-names", ",".join(CLASS_NAMES), "--seed", str(args.seed), "--no-progress"]
    for mode in ("marginal", "top_label"):
        report, wall, cpu = run_evaluate([*common, "--mode", mode, "--out", str(out / f"eval_{mode}")])
        print(f"\n$ calibops evaluate ... --mode {mode}")
        print("\n".join(line for line in report.splitlines() if not line.startswith("wrote ")))
        print(
            f"time: {wall:.1f} s wall, {cpu:.1f} s CPU for {args.cases} cases ({cpu / args.cases:.2f} s CPU a case), "
            f"load average {os.getloadavg()[0]:.2f}"
        )
    print(f"\nfigures: {out / 'eval_marginal'}, {out / 'eval_top_label'}, {out / 'anatomy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
