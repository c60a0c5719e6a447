"""Per-call overhead of the Python layer on small inputs: loss forward+backward calls per second.

    python benchmarks/bench_overhead.py [--baseline PATH] [--alternations 7] [--calls 300]

Measures ``MarginalL1ACELoss`` (module, built once) and ``functional.marginal_l1_ace`` (one Options per call) at
1x4x16^3 logits + labels, hard and soft, on the default backend. With ``--baseline PATH`` (a checkout of another
calibops version whose ``calibops/_C*.so`` is built, e.g. a ``git worktree`` of v0.2) each row is measured in
alternating subprocesses (``PYTHONPATH=PATH`` and this tree), ``--alternations`` times, so a load that drifts
during the run hits both sides alike; the table gives the medians and the ratio this/baseline of calls per
second. Prints the CPU, torch version and thread count.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(int(sys.argv[1]))
import calibops
from calibops import MarginalL1ACELoss
from calibops import functional as F
calls = int(sys.argv[2])
torch.manual_seed(0)
x = torch.randn(1, 4, 16, 16, 16, requires_grad=True)
y = torch.randint(0, 4, (1, 1, 16, 16, 16))
out = {}
for binning in ("hard", "soft"):
    mod = MarginalL1ACELoss(to_onehot_y=True, softmax=True, binning=binning)
    fns = {
        "module": lambda: mod(x, y),
        "functional": lambda: F.marginal_l1_ace(x, y, to_onehot_y=True, softmax=True, binning=binning),
    }
    for name, fn in fns.items():
        for _ in range(20):
            fn().backward()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn().backward()
        out[f"{name} {binning}"] = calls / (time.perf_counter() - t0)
out["__file__"] = calibops.__file__
print(json.dumps(out))
"""


def run(path: Path, threads: int, calls: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(path))
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(calls)],
        env=env,
        cwd=path,  # ``-c`` puts the working directory first on sys.path: it must be the checkout measured
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    where = out.pop("__file__")
    if not Path(where).resolve().is_relative_to(path.resolve()):  # e.g. an editable install shadowing PYTHONPATH
        raise SystemExit(f"{path}: the child imported calibops from {where}, not from this checkout")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="a calibops checkout (with its built _C) to compare with")
    ap.add_argument("--alternations", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="append the rows to this CSV (e.g. benchmarks/results/overhead.csv)")
    args = ap.parse_args()
    import torch
    from _common import cpu_name  # benchmarks/ is first on sys.path when run as a script

    cpu = cpu_name()
    load = os.getloadavg()[0]
    print(f"CPU {cpu}, torch {torch.__version__}, {args.threads} threads, load {load:.2f}")
    sides = {"this": HERE} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in sides}
    for _ in range(args.alternations):
        for side, path in sides.items():
            for k, v in run(path, args.threads, args.calls).items():
                samples[side].setdefault(k, []).append(v)
    print(f"load at the end {os.getloadavg()[0]:.2f}; medians of {args.alternations} alternations, calls/s")
    head = f"{'1x4x16^3 fwd+bwd':<20} {'this':>10}" + (f" {'baseline':>10} {'ratio':>7}" if args.baseline else "")
    print(head)
    rows = []
    for k in samples["this"]:
        a = statistics.median(samples["this"][k])
        b = statistics.median(samples["baseline"][k]) if args.baseline else None
        line = f"{k:<20} {a:>10.0f}" + (f" {b:>10.0f} {a / b:>7.2f}" if b else "")
        print(line)
        rows.append((k, a, b))
    if args.out:
        base = ""
        if args.baseline:
            rev = subprocess.run(
                ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            )
            base = f"{args.baseline.name}@{rev.stdout.strip()}" if rev.returncode == 0 else str(args.baseline)
        new = not args.out.exists()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(
                    [
                        "cpu",
                        "torch",
                        "threads",
                        "load",
                        "alternations",
                        "calls",
                        "row",
                        "this_calls_per_s",
                        "baseline",
                        "baseline_calls_per_s",
                        "ratio",
                    ]
                )
            for k, a, b in rows:
                w.writerow(
                    [
                        cpu,
                        torch.__version__,
                        args.threads,
                        f"{load:.2f}",
                        args.alternations,
                        args.calls,
                        k,
                        f"{a:.0f}",
                        base,
                        f"{b:.0f}" if b else "",
                        f"{a / b:.3f}" if b else "",
                    ]
                )


if __name__ == "__main__":
    main()
