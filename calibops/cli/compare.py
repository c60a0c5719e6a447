"""``calibops compare``: several ``calibops evaluate`` outputs side by side, one figure and one table.

    calibops compare RUN_DIR [RUN_DIR ...] [--names A B ...] [--out DIR] [--bootstrap-samples 1000] [--seed 0]
    python -m calibops compare ...

Each ``RUN_DIR`` is an output folder of ``calibops evaluate`` (or of ``calibops demo``'s ``runs/``): it reads
``summary.json`` (the macro and micro values, units), ``per_image.csv`` (the per-case values the bootstrap
resamples) and ``dataset_histogram.npz`` (the histograms of the figure). The runs must evaluate the same classes
in the same mode. It writes into ``--out``:

- ``comparison.pdf`` / ``.png`` (300 dpi): a row per run, a column per class and "all classes", each the dataset
  reliability histogram with its voxel counts (:func:`calibops.plot.comparison_grid`);
- ``comparison.md``, ``comparison.tex`` and ``comparison.csv``: per class (and the mean over classes) the macro and
  micro ECE / ACE / MCE, and Dice, volume CRPS, consensus Dice and Brier score where the runs have them, each
  macro value with its percentile bootstrap interval over cases, and every run's difference to the first run with
  the interval of the difference (paired: the same resampled cases for both runs when they hold the same cases;
  otherwise each run resampled on its own). Micro values pool the voxels of all cases, which ``per_image.csv``
  cannot resample: they carry no interval.

A failure is one line ``calibops compare: error: ...`` on stderr and writes nothing: exit status 2 for a usage
error (a run folder or file missing, names not matching the runs), 1 for runs that cannot be compared (other
classes, modes or bins) or files that cannot be read.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError, UsageParser

__all__ = ["Run", "build_parser", "compare_runs", "comparison_rows", "load_run", "main", "run_results"]

#: (key, label, per-case column of per_image.csv or None for a pooled value, summary column)
QUANTITIES = (
    ("macro_ece", "macro ECE", "ece", "macro_ece"),
    ("macro_ace", "macro ACE", "ace", "macro_ace"),
    ("macro_mce", "macro MCE", "mce", "macro_mce"),
    ("micro_ece", "micro ECE", None, "micro_ece"),
    ("micro_ace", "micro ACE", None, "micro_ace"),
    ("micro_mce", "micro MCE", None, "micro_mce"),
    ("dice", "Dice", "dice", "dice_mean"),
    ("consensus_dice", "consensus Dice", "consensus_dice", "consensus_dice_mean"),
    ("volume_crps", "volume CRPS", "volume_crps", "volume_crps_mean"),
    ("brier", "Brier score", "brier", "brier_mean"),
)
MEAN_ROW = "mean over classes"


class CompareError(Exception):
    """Runs that cannot be compared or read; one line on stderr, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``calibops compare``."""
    p = UsageParser(
        prog="calibops compare",
        description="Several `calibops evaluate` outputs side by side: one figure (a row per run, a column per "
        "class and 'all classes') and one table of macro/micro ECE, ACE, MCE (and Dice, CRPS where present) with "
        "bootstrap intervals and the differences to the first run, as Markdown, LaTeX and CSV.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folders of calibops evaluate (two or more)")
    p.add_argument(
        "--names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="one name per run, in order (space- or comma-separated; default: the folder names)",
    )
    p.add_argument("--out", default="calibops_compare", metavar="DIR", help="output directory (default: %(default)s)")
    p.add_argument(
        "--bootstrap-samples", type=int, default=1000, help="bootstrap resamples of the cases (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default: %(default)s)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only (no matplotlib needed)")
    return p


@dataclass
class Run:
    """One ``calibops evaluate`` output folder as read by :func:`load_run`."""

    name: str
    path: Path
    summary: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # class name -> summary row
    cases: list[str]  # in order of first appearance in per_image.csv
    per_case: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # column -> class -> (cases,)
    histogram: dict[str, np.ndarray] | None = None

    @property
    def class_names(self) -> list[str]:
        """The evaluated classes (summary order, without the mean row)."""
        return [n for n in self.rows if n != MEAN_ROW]

    @property
    def units(self) -> dict[str, str]:
        """``summary.json``'s units (empty for outputs written before units were recorded)."""
        return dict(self.summary.get("units") or {})


def _number(text: str) -> float:
    if text in ("", "nan", "None"):
        return math.nan
    return float(text)


def load_run(path: str | os.PathLike, name: str, *, figures: bool = True) -> Run:
    """Read one ``calibops evaluate`` output folder; raises :class:`UsageError` for a missing folder or file and
    :class:`CompareError` for one that cannot be read."""
    d = Path(path)
    if not d.is_dir():
        raise UsageError(f"run {name!r}: {str(d)!r} is not a directory; pass output folders of calibops evaluate")
    needed = ["summary.json", "per_image.csv"] + (["dataset_histogram.npz"] if figures else [])
    for f in needed:
        if not (d / f).is_file():
            raise UsageError(
                f"run {name!r}: {str(d / f)!r} not found; pass an output folder of calibops evaluate "
                + ("(--no-figures skips the histogram)" if f.endswith(".npz") else "(it writes this file)")
            )
    try:
        summary = json.loads((d / "summary.json").read_text())
        rows = {str(r["class_name"]): r for r in summary["summary"]}
        with open(d / "per_image.csv", newline="") as f:
            records = list(csv.DictReader(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompareError(
            f"run {name!r}: cannot read {str(d)!r} ({exc}); write it again with calibops evaluate"
        ) from exc
    if not records or "class_name" not in records[0] or "case" not in records[0]:
        raise CompareError(f"run {name!r}: {d / 'per_image.csv'} has no case/class_name rows")
    cases = list(dict.fromkeys(r["case"] for r in records))
    index = {c: i for i, c in enumerate(cases)}
    run = Run(name, d, summary, rows, cases)
    for _, _, col, _ in QUANTITIES:
        if col is None or col not in records[0]:
            continue
        table = {n: np.full(len(cases), np.nan) for n in run.class_names}
        for r in records:
            if r["class_name"] in table:
                table[r["class_name"]][index[r["case"]]] = _number(r[col])
        run.per_case[col] = table
    if figures:
        try:
            with np.load(d / "dataset_histogram.npz") as z:
                run.histogram = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise CompareError(f"run {name!r}: cannot read {d / 'dataset_histogram.npz'} ({exc})") from exc
    return run


def _check_comparable(runs: Sequence[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for what, a, b in (
            ("classes", first.class_names, run.class_names),
            ("mode", first.summary.get("mode"), run.summary.get("mode")),
            ("number of bins", first.summary.get("num_bins"), run.summary.get("num_bins")),
        ):
            if a != b:
                raise CompareError(
                    f"run {run.name!r} has {what} {b}, run {first.name!r} {a}: compare evaluations of the same "
                    "classes, mode and bins (see --class-names, --mode, --num-bins of calibops evaluate)"
                )


def _class_means(values: np.ndarray) -> np.ndarray:
    """(..., cases, K) -> (..., K + 1): per class the mean over cases (NaN-skipping), then their class mean."""
    with np.errstate(invalid="ignore"), _quiet():
        per_class = np.nanmean(values, axis=-2)
        return np.concatenate([per_class, np.nanmean(per_class, axis=-1, keepdims=True)], axis=-1)


class _quiet:
    """Silence NumPy's 'Mean of empty slice' warnings (NaN is the intended result there)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _percentiles(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    with _quiet():
        lo, hi = np.nanquantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def comparison_rows(
    runs: Sequence[Run], *, num_samples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[dict[str, Any]]:
    """The long-format table: one row per (class or mean over classes, quantity, run) with ``value``, the
    bootstrap interval ``lower`` / ``upper`` (macro quantities), ``diff`` / ``diff_lower`` / ``diff_upper`` to the
    first run, ``paired`` (whether the difference resampled the same cases), ``unit`` and ``cases``."""
    _check_comparable(runs)
    first = runs[0]
    classes = first.class_names
    labels = [*classes, MEAN_ROW]
    rng_seed = np.random.SeedSequence(seed)
    out: list[dict[str, Any]] = []
    for key, label, col, summary_col in QUANTITIES:
        if not all(summary_col in r.rows.get(classes[0], {}) for r in runs):
            continue
        unit = first.units.get(col or key.split("_", 1)[1], "")
        # bootstrap draws per run: (num_samples, K + 1) of the resampled class means (macro quantities)
        draws: dict[str, np.ndarray] = {}
        same_cases = all(r.cases == first.cases for r in runs)
        if col is not None and all(col in r.per_case for r in runs):
            shared = np.random.default_rng(rng_seed.spawn(1)[0]).integers(
                0, len(first.cases), (num_samples, len(first.cases))
            )
            for i, r in enumerate(runs):
                v = np.stack([r.per_case[col][n] for n in classes], axis=-1)  # (cases, K)
                idx = (
                    shared
                    if same_cases
                    else np.random.default_rng([seed, i]).integers(0, len(r.cases), (num_samples, len(r.cases)))
                )
                draws[r.name] = _class_means(v[idx])
        for k, cls in enumerate(labels):
            base = _value(first, cls, summary_col)
            for r in runs:
                value = _value(r, cls, summary_col)
                row: dict[str, Any] = {
                    "class_name": cls,
                    "quantity": key,
                    "label": label,
                    "run": r.name,
                    "value": value,
                    "lower": math.nan,
                    "upper": math.nan,
                    "diff": value - base if r is not first else math.nan,
                    "diff_lower": math.nan,
                    "diff_upper": math.nan,
                    "paired": same_cases if r is not first else "",
                    "unit": unit,
                    "cases": len(r.cases),
                }
                if r.name in draws:
                    lo, hi = _percentiles(draws[r.name][:, k], level)
                    row["lower"], row["upper"] = float(lo), float(hi)
                    if r is not first:
                        dlo, dhi = _percentiles(draws[r.name][:, k] - draws[first.name][:, k], level)
                        row["diff_lower"], row["diff_upper"] = float(dlo), float(dhi)
                out.append(row)
    return out


def _value(run: Run, cls: str, col: str) -> float:
    v = run.rows.get(cls, {}).get(col)
    return math.nan if v is None else float(v)


def _fmt(v: float, digits: int) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _digits(row: dict[str, Any]) -> int:
    return 1 if row["quantity"] == "volume_crps" else 4


def _cell(row: dict[str, Any], diff: bool = False) -> str:
    d = _digits(row)
    if diff:
        v, lo, hi = row["diff"], row["diff_lower"], row["diff_upper"]
        s = ("+" if not math.isnan(v) and v >= 0 else "") + _fmt(v, d)
    else:
        v, lo, hi = row["value"], row["lower"], row["upper"]
        s = _fmt(v, d)
    if not math.isnan(lo):
        s += f" [{_fmt(lo, d)}, {_fmt(hi, d)}]"
    return s


def _label(row: dict[str, Any], tex: bool = False) -> str:
    unit = row["unit"]
    if unit in ("mm^3", "voxels"):
        return f"{row['label']} ({'mm$^3$' if tex and unit == 'mm^3' else 'mm³' if unit == 'mm^3' else unit})"
    return row["label"]


def _grid(rows: list[dict[str, Any]], runs: Sequence[str], tex: bool = False) -> tuple[list[str], list[list[str]]]:
    head = ["class", "quantity", runs[0]]
    for name in runs[1:]:
        head += [name, f"{name} − {runs[0]}"]
    body = []
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["class_name"], row["quantity"]), {})[row["run"]] = row
    classes = list(dict.fromkeys(k[0] for k in by_key))
    quantities = list(dict.fromkeys(k[1] for k in by_key))
    for cls, q in ((c, q) for c in classes for q in quantities):  # grouped by class
        per_run = by_key[cls, q]
        first = per_run[runs[0]]
        line = [cls, _label(first, tex), _cell(first)]
        for name in runs[1:]:
            line += [_cell(per_run[name]), _cell(per_run[name], diff=True)]
        body.append(line)
    return head, body


def to_markdown(rows: list[dict[str, Any]], runs: Sequence[str], level: float = 0.95) -> str:
    """The comparison table in Markdown: a row per (class, quantity), a column per run and per difference."""
    head, body = _grid(rows, runs)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n\n" + _note(rows, runs, level) + "\n"


def _note(rows: list[dict[str, Any]], runs: Sequence[str], level: float) -> str:
    paired = all(r["paired"] is True for r in rows if r["run"] != runs[0]) if len(runs) > 1 else True
    return (
        f"Macro values: mean over cases (the class mean: mean over classes); [{100 * level:g}% percentile bootstrap "
        f"interval over cases]. Differences to {runs[0]}: "
        + ("paired, the same resampled cases for both runs" if paired else "runs resampled independently")
        + ". Micro values pool all voxels and have no interval. Calibration errors"
        + (", Dice" if any("dice" in r["quantity"] for r in rows) else "")
        + ": fractions in [0, 1]."
    )


def _tex_escape(text: str) -> str:
    out = str(text)
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}"),
    ):
        out = out.replace(a, b)
    return out


def to_latex(rows: list[dict[str, Any]], runs: Sequence[str], level: float = 0.95) -> str:
    """The comparison table as a LaTeX ``tabular`` (booktabs rules), cells as in :func:`to_markdown`."""
    head, body = _grid(rows, runs, tex=True)
    cols = "ll" + "r" * (len(head) - 2)

    def cell(text: str, is_label: bool) -> str:
        if is_label and "mm$^3$" in text:
            return _tex_escape(text.replace("mm$^3$", "MM3")).replace("MM3", "mm$^3$")
        return _tex_escape(text).replace("–", "--").replace("−", "$-$")

    lines = [
        "% written by calibops compare; needs \\usepackage{booktabs}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(cell(h, False) for h in head) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for line in body:
        if previous is not None and line[0] != previous:
            lines.append("\\midrule")
        previous = line[0]
        lines.append(" & ".join(cell(c, i == 1) for i, c in enumerate(line)) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "% " + _note(rows, runs, level)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "class_name",
    "quantity",
    "run",
    "value",
    "lower",
    "upper",
    "diff",
    "diff_lower",
    "diff_upper",
    "paired",
    "unit",
    "cases",
)


def compare_runs(
    dirs: Sequence[str | os.PathLike],
    names: Sequence[str] | None,
    out: str | os.PathLike,
    *,
    num_samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    figures: bool = True,
    echo: bool = True,
) -> list[Path]:
    """Compare the ``calibops evaluate`` outputs ``dirs`` (named ``names``) and write the figure and tables into
    ``out``; returns the written paths. Raises :class:`UsageError` / :class:`CompareError`."""
    if len(dirs) < 2:
        raise UsageError(f"give at least two run folders to compare, got {len(dirs)}")
    names = [Path(d).resolve().name for d in dirs] if names is None else list(names)
    if len(names) != len(dirs):
        raise UsageError(f"--names gives {len(names)} names for {len(dirs)} runs; give one name per run folder")
    if len(set(names)) != len(names) or any(not n.strip() for n in names):
        raise UsageError(f"--names must be distinct and non-empty, got {names}")
    if num_samples < 1:
        raise UsageError(f"--bootstrap-samples must be >= 1, got {num_samples}")
    if not 0 < level < 1:
        raise UsageError(f"--level must lie in (0, 1), got {level}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} names an existing file; pass a new or existing directory")
    if figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UsageError("the figure needs matplotlib: pip install 'calibops[plot]', or pass --no-figures") from exc
    runs = [load_run(d, n, figures=figures) for d, n in zip(dirs, names, strict=True)]
    rows = comparison_rows(runs, num_samples=num_samples, seed=seed, level=level)
    md = to_markdown(rows, names, level)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".calibops-tmp-", dir=out))
    try:
        (tmp / "comparison.md").write_text(md)
        (tmp / "comparison.tex").write_text(to_latex(rows, names, level))
        with open(tmp / "comparison.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if figures:
            _figure(runs, tmp / "comparison")
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    except (OSError, ValueError) as exc:
        raise CompareError(f"cannot write the comparison into --out {str(out)!r}: {exc}") from exc
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
    if echo:
        print(md, end="")
    return written


def _figure(runs: Sequence[Run], stem: Path) -> None:
    from ..plot import comparison_grid, save_figure

    hs = [r.histogram for r in runs]
    names = [str(n) for n in hs[0]["class_names"]]
    for r, h in zip(runs, hs, strict=True):
        if [str(n) for n in h["class_names"]] != names or h["histogram"].shape != hs[0]["histogram"].shape:
            raise CompareError(
                f"run {r.name!r}: its dataset_histogram.npz has other classes or bins than run {runs[0].name!r}"
            )
    fig = comparison_grid(
        [h["histogram"] for h in hs],
        [r.name for r in runs],
        counts=[h["counts"] for h in hs],
        class_names=names,
    )
    save_figure(fig, stem)


def run_results(metric: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """The results of a filled :class:`~calibops.metrics.DatasetCalibration` (``keep_records=True``) in the form
    ``calibops evaluate`` writes (``cli.evaluate._write_outputs``), so a training script or the demo can write a
    run folder that ``calibops compare`` reads. ``class_names``: one per input class (C)."""
    from .evaluate import _units, per_class_spread

    if len(class_names) != metric.num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {metric.num_classes} classes")
    cases = len({r["image"] for r in metric.records()})
    return {
        "metric": metric,
        "result": metric.compute(),
        "histogram": metric.histogram(),
        "counts": metric.pooled_counts(),
        "class_names": list(class_names),
        "num_cases": cases,
        "raters": 1,
        "mode": metric.mode,
        "spread": per_class_spread(metric),
        "units": _units(metric, 0, cases),
    }


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``calibops compare``; returns the exit status (0 ok, 1 runs not comparable, 2 usage)."""
    try:
        args = build_parser().parse_args(argv)
        names = None
        if args.names is not None:
            names = [n.strip() for part in args.names for n in part.split(",") if n.strip()]
        written = compare_runs(
            args.runs,
            names,
            args.out,
            num_samples=args.bootstrap_samples,
            seed=args.seed,
            level=args.level,
            figures=not args.no_figures,
        )
    except SystemExit as exc:  # --help
        return int(exc.code) if isinstance(exc.code, int) else 2
    except UsageError as exc:
        print(f"calibops compare: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except CompareError as exc:
        print(f"calibops compare: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
