"""calibops.HardL1ACELoss / SoftL1ACELoss against MONAI 1.7's monai.losses.HardL1ACELoss / SoftL1ACELoss.

One training step's loss work, forward + backward, from logits and an integer label map
(``to_onehot_y=True, softmax=True``, 20 bins, mean reduction), at the shapes of issue 22:
(2, 4, 64^3), (2, 14, 96^2 x 64) and (1, 4, 160^3).

- time: the median of ``--reps`` alternations (calibops, MONAI, calibops, MONAI, ...; each call followed by its
  backward), so a change of machine load hits both sides alike; the spread (min..max) is printed too.
- peak extra memory: the most bytes held at once by the call and its backward beyond what existed before it
  (the input gradient included). CPU: from ``torch.profiler``'s memory events (``profile_memory=True``; each
  allocation and free in time order), since torch's CPU tensors are not seen by ``tracemalloc``. CUDA:
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
- the loss values of both are compared (float32 rounding), so a wrong calibops result cannot be timed.

Without MONAI 1.7 (``monai.losses`` lacking ``HardL1ACELoss``) only the calibops rows are measured.
Device, versions and the machine's load average (before / after) are printed and stored in every CSV row.

    python benchmarks/bench_monai.py                       # CPU, the three shapes, hard + soft, writes
                                                           # benchmarks/results/monai17_cpu_<cpu>.csv
    python benchmarks/bench_monai.py --device cuda         # the GPU variant (scripts/gpu_check.sh, step bench)
    python benchmarks/bench_monai.py --dry-run             # tiny shapes, 2 alternations: checks the script
Options: --shapes "2x4x64x64x64,..." --binning hard,soft --reps N --out PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, write_csv  # noqa: E402

import calibops  # noqa: E402

SHAPES = "2x4x64x64x64,2x14x96x96x64,1x4x160x160x160"
DRY_SHAPES = "2x4x8x8x8,1x3x6x6x6"


def monai_losses():
    """``monai.losses`` when it ships MONAI 1.7's calibration losses, else None."""
    try:
        import monai.losses as ml
    except ImportError:
        return None
    return ml if hasattr(ml, "HardL1ACELoss") else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(loss, x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward + backward; returns the loss value."""
    x.grad = None
    out = loss(x, y)
    out.backward()
    return float(out.detach())


def peak_extra_bytes(loss, x: torch.Tensor, y: torch.Tensor) -> int:
    """The most bytes held at once by one forward + backward beyond those allocated before it."""
    x.grad = None
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(loss, x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(loss, x, y)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def _shape(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.lower().split("x"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--binning", default="hard,soft")
    ap.add_argument("--reps", type=int, default=None, help="alternations (default 7 on CUDA, 5 on CPU)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_monai: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    shapes = [_shape(s) for s in (args.shapes or (DRY_SHAPES if args.dry_run else SHAPES)).split(",") if s]
    reps = args.reps or (2 if args.dry_run else (7 if device.type == "cuda" else 5))
    ml = monai_losses()
    env = environment()
    env["monai"] = "-"
    if ml is not None:
        import monai

        env["monai"] = monai.__version__
    load_before = os.getloadavg()
    env_line = ", ".join(f"{k} {v}" for k, v in env.items())
    print(f"# {env_line}; load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if ml is None:
        print(
            "# monai.losses.HardL1ACELoss is not installed (MONAI >= 1.7, e.g. monai-weekly==1.7.dev2643): "
            "calibops only"
        )
    print(f"# forward+backward, to_onehot_y=True, softmax=True, 20 bins; median of {reps} alternations; {device}")

    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        B, C, *spatial = shape
        x = (torch.randn(*shape, generator=g) * 2).to(device).requires_grad_(True)
        y = torch.randint(0, C, (B, 1, *spatial), generator=g).to(device)
        for binning in args.binning.split(","):
            ours_cls = {"hard": calibops.HardL1ACELoss, "soft": calibops.SoftL1ACELoss}[binning]
            impls = {"calibops": ours_cls(to_onehot_y=True, softmax=True)}
            if ml is not None:
                impls["monai"] = {"hard": ml.HardL1ACELoss, "soft": ml.SoftL1ACELoss}[binning](
                    to_onehot_y=True, softmax=True
                )
            values = {name: step(loss, x, y) for name, loss in impls.items()}  # warm-up, and the values compared
            if "monai" in values and abs(values["calibops"] - values["monai"]) > 1e-5:
                raise SystemExit(f"calibops {values['calibops']} != MONAI {values['monai']} at {shape} {binning}")
            times: dict[str, list[float]] = {name: [] for name in impls}
            for _ in range(reps):
                for name, loss in impls.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    step(loss, x, y)
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
            peaks = {name: peak_extra_bytes(loss, x, y) for name, loss in impls.items()}
            for name in impls:
                med = statistics.median(times[name])
                row = {
                    "shape": "x".join(map(str, shape)),
                    "binning": binning,
                    "impl": name,
                    "fwd_bwd_ms": round(med * 1e3, 2),
                    "min_ms": round(min(times[name]) * 1e3, 2),
                    "max_ms": round(max(times[name]) * 1e3, 2),
                    "peak_extra_MiB": round(peaks[name] / 2**20, 1),
                    "loss": f"{values[name]:.7f}",
                    "reps": reps,
                    "device": str(device),
                }
                if name == "calibops" and "monai" in impls:
                    row["speedup_vs_monai"] = round(statistics.median(times["monai"]) / med, 2)
                    row["memory_ratio_vs_monai"] = round(peaks[name] / max(peaks["monai"], 1), 3)
                rows.append(row)
                print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    load_after = os.getloadavg()
    cols = ["shape", "binning", "impl", "fwd_bwd_ms", "min_ms", "max_ms", "peak_extra_MiB", "speedup_vs_monai"]
    print_table(rows, cols + ["memory_ratio_vs_monai"])
    print(f"# load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    for r in rows:
        r.update(env)
        r["load_before"] = f"{load_before[0]:.2f}"
        r["load_after"] = f"{load_after[0]:.2f}"
    out = args.out
    if out is None:
        tag = env.get("gpu", env["cpu"]) if device.type == "cuda" else env["cpu"]
        slug = re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")[:40]
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"monai17_{device.type}_{slug}.csv")
        if args.dry_run:
            out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench_monai_dry_run.csv")
    write_csv(out, rows)
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
