"""CPU benchmark: forward cost of each evaluation protocol, calibops against the plain-PyTorch way.

Per protocol (docs/evaluation.md), both computed on the same inputs in the same run, same thread count:

- ``top_label_pooled``: top-label ECE pooled over the voxels of a batch. calibops: one top-label statistics call,
  summed over images (``pool_stats`` + ``calibration_errors_from_stats``, which also gives L2 and MCE). Plain:
  torchmetrics' ``MulticlassCalibrationError`` on the flattened voxels (permute + reshape to (N, C)), one call per
  norm the way it is used (l1 here; l2 and max would each be another full call).
- ``curvas_ece``: the CURVAS 2024 number, top-label ECE per rater (3 raters, 50 bins) averaged. calibops: one
  multi-rater call. Plain: torchmetrics once per rater (the challenge's loop).
- ``volume_crps``: closed-form CRPS of the predicted volume against the raters' Gaussian. calibops: one one-bin
  multi-rater statistics call. Plain: softmax, Σp per class, one-hot counts per rater, the formula.
- ``brier``: marginal Brier score per image and class from logits and labels, at ``--brier-shape`` (default
  2x4x64x64x64, the issue-23 target: >= 5x). calibops: one-bin statistics with moments (the CPU kernel's fused
  forward). Plain: softmax, one_hot, mean of squares.
- ``classification``: top-label ECE of a batch of (B, C) samples. calibops: ``classification_calibration_errors``.
  Plain: torchmetrics.

Timings are medians of ``--reps`` runs after warm-up (benchmarks/_common.py ``median_time``); the ratio is
plain / calibops (> 1: calibops faster). The calibops backend is ``auto`` (the compiled CPU kernels when built,
else the pure-PyTorch reference, printed per row).

    python benchmarks/bench_eval.py            # writes benchmarks/results/eval_<cpu>.csv
    python benchmarks/bench_eval.py --quick    # small shapes, few repetitions (checks the script)
    python benchmarks/bench_eval.py --protocols brier --reps 9   # one row
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import calibops.functional as F  # noqa: E402
from benchmarks._common import environment, median_time, print_table, write_csv  # noqa: E402
from calibops.backends.resolve import resolve_backend  # noqa: E402
from calibops.evaluation import crps_gaussian, pool_stats  # noqa: E402
from calibops.results import calibration_errors_from_stats  # noqa: E402


def _plain_volume_crps(x: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    C = x.shape[1]
    p = torch.softmax(x, 1)
    v = p.flatten(2).sum(2).double()
    vols = torch.stack([(raters == c).flatten(2).sum(2) for c in range(C)], 1).double()  # (B, C, R)
    return crps_gaussian(v, vols.mean(-1), vols.std(-1, unbiased=False))[:, 1:]


def _plain_brier(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    C = x.shape[1]
    p = torch.softmax(x, 1).flatten(2)
    y = torch.nn.functional.one_hot(labels.flatten(1), C).movedim(-1, 1).float()
    return ((p - y) ** 2).mean(-1)[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shape", default="2x4x64x64x32", help="B x C x spatial of the segmentation inputs")
    ap.add_argument("--brier-shape", default="2x4x64x64x64", help="B x C x spatial of the brier row")
    ap.add_argument("--protocols", default=None, help="comma-separated rows to run (default: all)")
    ap.add_argument("--samples", type=int, default=100_000, help="samples of the classification batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.shape, args.brier_shape, args.samples, args.reps = "2x4x16x16x8", "2x4x16x16x8", 2000, 2
    torch.set_num_threads(args.threads)
    tm = None
    try:
        from torchmetrics.classification import MulticlassCalibrationError

        tm = MulticlassCalibrationError
    except ImportError:
        print("torchmetrics not installed: the torchmetrics baselines are skipped")
    dims = [int(v) for v in args.shape.split("x")]
    B, C, spatial = dims[0], dims[1], tuple(dims[2:])
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(B, C, *spatial, generator=g)
    labels = torch.randint(0, C, (B, *spatial), generator=g)
    raters = torch.randint(0, C, (B, 3, *spatial), generator=g)
    probs = torch.softmax(x, 1)
    xs = torch.randn(args.samples, 10, generator=g)
    ys = torch.randint(0, 10, (args.samples,), generator=g)
    bdims = [int(v) for v in args.brier_shape.split("x")]
    xb = 2 * torch.randn(*bdims, generator=g)
    lb = torch.randint(0, bdims[1], (bdims[0], *bdims[2:]), generator=g)
    backend = resolve_backend("auto", x.device, x.dtype)
    env = environment()
    print("  ".join(f"{k}={v}" for k, v in env.items()), f"calibops backend={backend}")

    def top_cal():
        s = F.binned_stats(probs, labels, num_bins=15, to_onehot_y=True, mode="top_label", validate=False)
        return calibration_errors_from_stats(pool_stats(s))

    def top_plain():
        return tm(num_classes=C, n_bins=15, validate_args=False)(
            probs.movedim(1, -1).reshape(-1, C), labels.reshape(-1)
        )

    def curvas_cal():
        return F.calibration_errors(
            probs, raters, num_bins=50, to_onehot_y=True, mode="top_label", multi_rater=True, validate=False
        ).ece.mean(1)

    def curvas_plain():
        out = []
        for b in range(B):
            flat = probs[b].reshape(C, -1).t()
            out.append(
                sum(
                    float(tm(num_classes=C, n_bins=50, validate_args=False)(flat, raters[b, r].reshape(-1)))
                    for r in range(3)
                )
                / 3
            )
        return out

    cases = [
        ("top_label_pooled", top_cal, top_plain if tm else None, f"{B}x{C}x{'x'.join(map(str, spatial))}"),
        ("curvas_ece", curvas_cal, curvas_plain if tm else None, f"{B}x{C}x{'x'.join(map(str, spatial))} R=3"),
        (
            "volume_crps",
            lambda: F.volume_crps(x, raters, softmax=True, validate=False),
            lambda: _plain_volume_crps(x, raters),
            f"{B}x{C}x{'x'.join(map(str, spatial))} R=3",
        ),
        (
            "brier",
            lambda: F.brier_score(xb, lb, to_onehot_y=True, softmax=True, validate=False),
            lambda: _plain_brier(xb, lb),
            args.brier_shape,
        ),
        (
            "classification",
            lambda: F.classification_calibration_errors(xs, ys, softmax=True, validate=False),
            (lambda: tm(num_classes=10, n_bins=15, validate_args=False)(xs, ys)) if tm else None,
            f"{args.samples}x10",
        ),
    ]
    if args.protocols:
        wanted = args.protocols.split(",")
        unknown = sorted(set(wanted) - {c[0] for c in cases})
        if unknown:
            ap.error(f"--protocols: unknown {unknown}, expected names from {[c[0] for c in cases]}")
        cases = [c for c in cases if c[0] in wanted]
    rows = []
    with torch.no_grad():
        for name, cal, plain, shape in cases:
            t_cal = median_time(cal, warmup=1, reps=args.reps)
            t_plain = median_time(plain, warmup=1, reps=args.reps) if plain else float("nan")
            rows.append(
                {
                    "protocol": name,
                    "shape": shape,
                    "backend": backend,
                    "calibops_ms": f"{1e3 * t_cal:.2f}",
                    "plain_ms": f"{1e3 * t_plain:.2f}",
                    "plain/calibops": f"{t_plain / t_cal:.2f}",
                    **env,
                }
            )
    print_table(rows, ["protocol", "shape", "backend", "calibops_ms", "plain_ms", "plain/calibops"])
    cpu = re.sub(r"[^a-z0-9]+", "_", env["cpu"].lower()).strip("_")[:40]
    out = args.out or os.path.join(HERE, "results", f"eval_{cpu}{'_quick' if args.quick else ''}.csv")
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
