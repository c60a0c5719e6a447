"""Shared benchmark pieces: the torch-vectorised baseline, the byte model of docs/kernel_contract.md, environment, CSV.

The baseline is the best plain-PyTorch formulation a user would write (softmax, one_hot, bucketize,
scatter_add, autograd backward); every speed ratio in the benchmark tables is against it, measured in the
same run on the same device.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

EPS32 = float(torch.finfo(torch.float32).eps)


def torch_vectorised_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    probs_target: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_bins: int = 20,
    soft: bool = False,
    empty_weight: float = 0.01,
) -> torch.Tensor:
    """mL1-ACE (mean reduction, empty classes ignored) in plain PyTorch.

    Either ``logits`` [B, C, *sp] with integer ``labels`` [B, *sp] (softmax + one_hot inside), or
    ``probs_target=(probs, onehot)`` (pass ``logits=None``).
    """
    if probs_target is None:
        B, C = logits.shape[:2]
        p = torch.softmax(logits.float(), dim=1).reshape(B, C, -1)
        y = torch.nn.functional.one_hot(labels.reshape(B, -1).long(), C).permute(0, 2, 1).float()
    else:
        p, y = probs_target
        B, C = p.shape[:2]
        p = p.float().reshape(B, C, -1)
        y = y.float().reshape(B, C, -1)
    M = num_bins
    if not soft:
        edges = torch.linspace(0, 1 + EPS32, M + 1, dtype=torch.float32, device=p.device)
        idx = torch.bucketize(p.detach(), edges[1:]).clamp_(max=M - 1)
        n = torch.zeros(B, C, M, device=p.device).scatter_add_(2, idx, torch.ones_like(p))
        sp = torch.zeros(B, C, M, device=p.device).scatter_add(2, idx, p)
        sy = torch.zeros(B, C, M, device=p.device).scatter_add_(2, idx, y)
        valid = n > 0
    else:
        centres = torch.linspace(0, 1 + EPS32, 2 * M + 1, dtype=torch.float32, device=p.device)[1::2].contiguous()
        t = torch.bucketize(p.detach(), centres) - 1
        lo = t.clamp(0, max(M - 2, 0))
        hi = (lo + 1).clamp(max=M - 1)
        d = (centres[hi] - centres[lo]).clamp(min=EPS32)
        w_lo = (centres[hi] - p) / d
        w_lo = torch.where(t < 0, torch.ones_like(w_lo), torch.where(t >= M - 1, torch.zeros_like(w_lo), w_lo))
        w_hi = 1 - w_lo
        z = torch.zeros(B, C, M, device=p.device)
        n = z.scatter_add(2, lo, w_lo).scatter_add(2, hi, w_hi)
        sp = z.scatter_add(2, lo, w_lo * p).scatter_add(2, hi, w_hi * p)
        sy = z.scatter_add(2, lo, w_lo * y).scatter_add(2, hi, w_hi * y)
        valid = (n >= empty_weight) & (n > 0)
    den = torch.where(valid, n, torch.ones_like(n))
    gap = torch.where(valid, (sp / den - sy / den).abs(), torch.zeros_like(n))
    ace = gap.sum(-1) / valid.sum(-1).clamp(min=1)
    ace = ace * (y.sum(-1) > 0)
    return ace.mean()


def contract_bytes(input: torch.Tensor, target: torch.Tensor, mode: str) -> int:
    """Bytes docs/kernel_contract.md says must move: forward reads input+target once; backward reads them once
    more and writes the gradient (input's size). ``mode`` is "fwd", "bwd" or "fwd+bwd"."""
    io = input.numel() * input.element_size() + target.numel() * target.element_size()
    grad = input.numel() * input.element_size()
    return {"fwd": io, "bwd": io + grad, "fwd+bwd": 2 * io + grad}[mode]


def environment() -> dict[str, str]:
    """Device and versions, printed at the top of every table and stored in every CSV row."""
    import calibops

    env = {
        "calibops": calibops.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), for every table's header."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(
    fn: Callable[[], object], warmup: int = 2, reps: int = 7, sync: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds (CPU timing; GPU scripts use triton.testing.do_bench)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Write benchmark rows (dicts with the same keys) to ``path``, creating the folder."""
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print rows as an aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))
