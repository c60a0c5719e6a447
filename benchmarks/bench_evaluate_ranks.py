"""Throughput of ``calibops evaluate``: cases per second with 1 and 2 ranks, prefetch on and off.

Writes a 1-mm-sized test set (182 x 218 x 182 voxels, 4 classes; nnU-Net layout: ``.npz`` probabilities, key
``probabilities``, (C, z, y, x), next to NIfTI ``.nii.gz`` labels) into ``--data`` (once; not part of the
repository), then runs every configuration ``--rounds`` times, alternating them so a change of machine load
hits all alike, and prints the medians:

- ``eval s``: the evaluation itself, ``wall_time_s`` of ``summary.json`` (rank 0: reading, checking, computing,
  reducing; no interpreter start, no figures, no writing);
- ``cases/s``: cases / ``eval s``;
- ``command s``: the whole command, interpreter and (for 2 ranks) torchrun start included.

1 rank is ``python -m calibops evaluate`` with torch's default threads; 2 ranks is ``torchrun --nproc-per-node 2``
(OMP_NUM_THREADS=1 per rank, torchrun's default).

    python benchmarks/bench_evaluate_ranks.py --data /tmp/calibops_bench --cases 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPE = (182, 218, 182)
C = 4


def write_data(root: str, n: int) -> None:
    """``n`` cases of synthetic probabilities (blocky noise plus voxel noise around ellipsoid labels)."""
    import nibabel as nib
    import numpy as np

    os.makedirs(os.path.join(root, "pred"), exist_ok=True)
    os.makedirs(os.path.join(root, "label"), exist_ok=True)
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in SHAPE), indexing="ij")
    for i in range(n):
        pred = os.path.join(root, "pred", f"case{i:03d}.npz")
        if os.path.exists(pred):
            continue
        rng = np.random.default_rng(i)
        lab = np.zeros(SHAPE, np.int16)
        for c in range(1, C):
            for _ in range(2):
                centre = [rng.uniform(0.25, 0.75) * s for s in SHAPE]
                r = rng.uniform(15, 35, 3)
                inside = sum(((g - m) / rr) ** 2 for g, m, rr in zip((x, y, z), centre, r)) < 1
                lab[inside] = c
        coarse = rng.normal(size=(C, 23, 28, 23)).astype(np.float32) * 2.5
        logits = coarse.repeat(8, 1).repeat(8, 2).repeat(8, 3)[:, : SHAPE[0], : SHAPE[1], : SHAPE[2]]
        logits += 0.5 * rng.standard_normal(size=logits.shape, dtype=np.float32)  # compresses like real maps
        logits += 6.0 * (lab[None] == np.arange(C, dtype=np.int16)[:, None, None, None])
        logits -= logits.max(0, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(0, keepdims=True)
        np.savez_compressed(pred, probabilities=np.ascontiguousarray(p.transpose(0, 3, 2, 1)))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), os.path.join(root, "label", f"case{i:03d}.nii.gz"))


def run(root: str, ranks: int, prefetch: int) -> tuple[float, float]:
    """``(evaluation seconds from summary.json, command seconds)`` of one run."""
    out = tempfile.mkdtemp(prefix="calibops-bench-")
    args = ["evaluate", "--pred", f"{root}/pred", "--label", f"{root}/label", "--out", out]
    args += ["--no-figures", "--no-progress", "--prefetch", str(prefetch)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if ranks == 1:
        cmd = [sys.executable, "-m", "calibops", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd += ["-m", "calibops", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json")) as f:
        report = json.load(f)
    assert report["world_size"] == ranks and report["prefetch"] == prefetch
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    os.rmdir(out)
    return float(report["wall_time_s"]), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "calibops_bench_1mm"))
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default="1:0,1:1,2:0,2:1", help="ranks:prefetch pairs")
    a = p.parse_args()
    write_data(a.data, a.cases)
    configs = [tuple(int(v) for v in c.split(":")) for c in a.configs.split(",")]
    times: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in configs}
    for k in range(a.rounds):
        order = configs if k % 2 == 0 else configs[::-1]
        for c in order:
            times[c].append(run(a.data, *c))
            print(
                f"round {k + 1}: ranks {c[0]} prefetch {c[1]}: eval {times[c][-1][0]:.1f} s, "
                f"command {times[c][-1][1]:.1f} s, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    size = sum(os.path.getsize(os.path.join(a.data, "pred", f)) for f in os.listdir(os.path.join(a.data, "pred")))
    print(f"\n{a.cases} cases, {size / a.cases / 1e6:.0f} MB .npz each, medians of {a.rounds} alternated rounds")
    print("| ranks | prefetch | eval s | cases/s | command s |")
    print("|---|---|---|---|---|")
    for c in configs:
        ev = statistics.median(t[0] for t in times[c])
        cmd = statistics.median(t[1] for t in times[c])
        print(f"| {c[0]} | {'on (1)' if c[1] else 'off'} | {ev:.1f} | {a.cases / ev:.2f} | {cmd:.1f} |")


if __name__ == "__main__":
    main()
