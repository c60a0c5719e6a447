"""Scaffolding of ``calibops demo``: the machine line, the per-seed table, and the spread over seeds."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Mapping

import torch

from ._data import CLASS_NAMES

__all__ = ["CSV_COLUMNS", "format_spread", "format_table", "load_average", "machine_line", "spread"]

CSV_COLUMNS = (
    "seed",
    "loss",
    "dsc",
    "ace",
    "mce",
    "ece",
    "micro_ace",
    "micro_mce",
    *(f"dsc_{name}" for name in CLASS_NAMES[1:]),
    *(f"ace_{name}" for name in CLASS_NAMES[1:]),
    "dsc_change_pct",
    "ace_change_pct",
    "mce_change_pct",
    "train_seconds",
    "shared_seconds",
    "steps",
    "shared_steps",
    "device",
    "threads",
)

#: (row key, column head) of the relative changes summarised over seeds
CHANGES = (("dsc_change_pct", "dDSC %"), ("ace_change_pct", "dACE %"), ("mce_change_pct", "dMCE %"))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """``"load average X"`` (1-minute), or ``"load average unknown"`` where the platform has none."""
    try:
        return f"load average {os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "load average unknown"


def machine_line(device: torch.device, jobs: int, threads: int) -> str:
    """One line naming the device, parallelism, CPU, Python, torch and OS (printed with every run)."""
    where = f"{jobs} training(s) at once x {threads} torch thread(s), {os.cpu_count()} logical core(s), {_cpu_name()}"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device) + f"; data prep on {where}"
    return (
        f"device: {device.type} ({where}); python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def _grid(cells: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(rows: Iterable[Mapping]) -> str:
    """The table of one seed: absolute metrics, relative changes against the baseline, training time."""
    keys = ("dsc", "ace", "mce", "ece", "micro_ace", "micro_mce", "dsc_change_pct", "ace_change_pct")
    head = ["loss", "DSC", "ACE", "MCE", "ECE", "micro ACE", "micro MCE", "dDSC %", "dACE %", "dMCE %", "train s"]
    cells = [head]
    for row in rows:
        values = [f"{row[k]:+.1f}" if k.endswith("_pct") else f"{row[k]:.4f}" for k in keys]
        cells.append([row["loss"], *values, f"{row['mce_change_pct']:+.1f}", f"{row['train_seconds']:.1f}"])
    return _grid(cells)


def spread(rows: Iterable[Mapping], configs: Mapping[str, object]) -> dict:
    """Summarise per-seed rows: for each non-baseline configuration and relative change, ``(mean, min, max)``
    over the seeds; and for each of the papers' findings, on how many seeds it holds.

    Returns ``{"changes": {config: {key: (mean, min, max)}}, "holds": {finding: (n_true, n_seeds)}}``.
    """
    names = list(configs)
    base, hard, soft = names[0], names[1], names[2]
    by_seed: dict[int, dict[str, Mapping]] = {}
    for row in rows:
        by_seed.setdefault(int(row["seed"]), {})[row["loss"]] = row
    changes: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name in names[1:]:
        changes[name] = {}
        for key, _ in CHANGES:
            vals = [seed_rows[name][key] for seed_rows in by_seed.values()]
            changes[name][key] = (sum(vals) / len(vals), min(vals), max(vals))
    findings = {
        "ACE soft < hard < Dice+CE": lambda r: r[soft]["ace"] < r[hard]["ace"] < r[base]["ace"],
        "MCE soft < hard < Dice+CE": lambda r: r[soft]["mce"] < r[hard]["mce"] < r[base]["mce"],
        "hard DSC within 0.01 of Dice+CE": lambda r: abs(r[hard]["dsc"] - r[base]["dsc"]) <= 0.01,
        "soft DSC within 0.03 of Dice+CE": lambda r: abs(r[soft]["dsc"] - r[base]["dsc"]) <= 0.03,
    }
    holds = {text: (sum(bool(test(r)) for r in by_seed.values()), len(by_seed)) for text, test in findings.items()}
    return {"changes": changes, "holds": holds}


def format_spread(summary: Mapping, seeds: Iterable[int]) -> str:
    """Print :func:`spread`'s result: mean [min, max] of each relative change, and where the findings hold."""
    seeds = list(seeds)
    cells = [["loss", *(head + " mean [min, max]" for _, head in CHANGES)]]
    for name, stats in summary["changes"].items():
        cells.append([name, *(f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in (stats[k] for k, _ in CHANGES))])
    holds = "; ".join(f"{text}: {n}/{total} seeds" for text, (n, total) in summary["holds"].items())
    return (
        f"spread over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): relative change against dice_ce\n"
        f"{_grid(cells)}\n"
        f"the papers' findings, on how many seeds they hold: {holds}"
    )
