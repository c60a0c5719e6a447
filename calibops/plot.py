"""Matplotlib figures in one style: dataset reliability histograms, reliability diagrams, comparisons.

matplotlib is an optional dependency (extra ``plot``) imported only when a figure is made. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot state, safe in loops and without a display).

The style, written once here and used by every figure calibops makes (the CLI, the demo, the integrations):

- sizes for a journal page: :data:`SINGLE_COLUMN` (3.5 in) and :data:`DOUBLE_COLUMN` (7 in) wide; the figure
  size is the print size, so a font size in points is what the reader sees;
- every text at least :data:`MIN_FONT_PT` (7 pt): labels 8 pt, tick labels, legends and corner notes 7 pt;
- colour-blind-safe colours: the perceptually uniform ``viridis`` map for heat maps and the Okabe-Ito palette
  (:data:`OKABE_ITO`) for lines and bars;
- axes aligned: a heat map and the count bars under it share their x extent, and the colour bar has its own
  column instead of taking width from the heat maps;
- :func:`save_figure` writes a vector PDF (fonts embedded as TrueType, editable) and a 300-dpi PNG of each figure.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._optional import require

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "DOUBLE_COLUMN",
    "MIN_FONT_PT",
    "OKABE_ITO",
    "PNG_DPI",
    "SINGLE_COLUMN",
    "column_normalise",
    "comparison_grid",
    "dataset_reliability_histogram",
    "file_stem",
    "pooled_reliability",
    "reliability_diagram",
    "save_figure",
]

#: width of a single-column figure in inches (most journals: 3.3-3.5 in)
SINGLE_COLUMN = 3.5
#: width of a double-column (full page width) figure in inches
DOUBLE_COLUMN = 7.0
#: the smallest font size of any text in a calibops figure, in points at print size
MIN_FONT_PT = 7.0
#: resolution of the PNG written next to every PDF
PNG_DPI = 300
#: Okabe & Ito's colour-blind-safe palette (distinguishable under the common colour-vision deficiencies)
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}
HEAT_CMAP = "viridis"  # perceptually uniform and colour-blind safe; cividis and magma are too
LABEL_PT = 8.0
SMALL_PT = 7.0
TITLE_PT = 8.0
SUPTITLE_PT = 9.0
_BAR_GREY = "0.4"
_ACC_COLOUR = OKABE_ITO["blue"]
_GAP_COLOUR = OKABE_ITO["vermillion"]
_CONF_COLOUR = OKABE_ITO["orange"]

_EPS32 = float(torch.finfo(torch.float32).eps)


def _import_matplotlib():
    for module in ("matplotlib.colors", "matplotlib.figure"):
        require(module, extra="plot", what="calibops.plot")
    return sys.modules["matplotlib"]


def _figure_width(width: str | float) -> float:
    if width == "single":
        return SINGLE_COLUMN
    if width == "double":
        return DOUBLE_COLUMN
    if isinstance(width, (int, float)) and not isinstance(width, bool) and math.isfinite(width) and width > 0:
        return float(width)
    raise ValueError(f"width must be 'single', 'double' or a positive number of inches, got {width!r}")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.04, hspace=0.04)
    return fig


def _finish(fig: Figure) -> Figure:
    """Apply the style's floor on font sizes to every text and tick label of ``fig`` (a safety net: the
    builders set their sizes explicitly) and return it."""
    from matplotlib.text import Text

    for ax in fig.axes:
        for axis, labels in (("x", ax.get_xticklabels(which="both")), ("y", ax.get_yticklabels(which="both"))):
            if any(t.get_fontsize() < MIN_FONT_PT for t in labels):
                ax.tick_params(axis=axis, which="both", labelsize=SMALL_PT)
        for t in (ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()):
            t.set_fontsize(max(t.get_fontsize(), MIN_FONT_PT))
    for t in fig.findobj(Text):
        if t.get_fontsize() < MIN_FONT_PT:
            t.set_fontsize(SMALL_PT)
    return fig


def file_stem(name: str) -> str:
    """A file-name-safe form of a class or run name: ``"left kidney"`` -> ``"left_kidney"`` (letters, digits,
    ``-``, ``_`` and ``.`` kept; runs of anything else become one ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_.")
    return stem or "unnamed"


def save_figure(fig: Figure, stem: str | os.PathLike, *, dpi: int = PNG_DPI) -> list[Path]:
    """Write ``fig`` as ``<stem>.pdf`` (vector, TrueType fonts) and ``<stem>.png`` (``dpi``, default 300) at its
    own size; returns the two paths. A ``.pdf``/``.png`` suffix on ``stem`` is dropped."""
    import matplotlib

    stem = Path(stem)
    if stem.suffix.lower() in (".pdf", ".png"):
        stem = stem.with_suffix("")
    paths = [stem.with_name(stem.name + ".pdf"), stem.with_name(stem.name + ".png")]
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}):
        fig.savefig(paths[0])
        fig.savefig(paths[1], dpi=dpi)
    return paths


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc


def column_normalise(histogram: Any) -> np.ndarray:
    """``H[..., a, j] / Σ_a H[..., a, j]`` as float64; empty columns are NaN (drawn as background)."""
    h = _to_numpy(histogram, "histogram")
    tot = h.sum(axis=-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, h / np.where(tot > 0, tot, 1.0), np.nan)


def _log_counts(ax: Any) -> None:
    """Log y scale with a few decade labels only (small count panels stay readable)."""
    from matplotlib.ticker import LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=3))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _edges(num_bins: int) -> np.ndarray:
    # The bin edges (docs/usage.md "Semantics") end at 1 + eps32; draw them ending at 1 so the axes read 0..1.
    return np.linspace(0.0, 1.0, num_bins + 1)


def _count_bars(ax: Any, bars: np.ndarray, label: str | None, xlabel: bool) -> None:
    """Per-confidence-bin amounts as grey bars on a log scale, x from 0 to 1."""
    M = bars.shape[0]
    edges = _edges(M)
    b = np.asarray(bars, dtype=np.float64)
    ax.bar(0.5 * (edges[:-1] + edges[1:]), np.where(b > 0, b, np.nan), width=1.0 / M, color=_BAR_GREY, edgecolor="none")
    if np.any(b > 0):
        _log_counts(ax)
    ax.set_xlim(0, 1)
    ax.tick_params(labelsize=SMALL_PT)
    if label:
        ax.set_ylabel(label, fontsize=SMALL_PT)
    if xlabel:
        ax.set_xlabel("predicted probability", fontsize=LABEL_PT)
    else:
        ax.tick_params(labelbottom=False)


def _draw_heat(ax: Any, hmap: np.ndarray, M: int, cm: Any, norm: Any, title: str | None) -> Any:
    """One column-normalised heat map with the y = x diagonal into ``ax``; returns the mesh."""
    edges = _edges(M)
    data = np.ma.masked_invalid(column_normalise(hmap))
    mesh = ax.pcolormesh(edges, edges, data, cmap=cm, norm=norm, shading="flat", rasterized=False)
    ax.plot([0, 1], [0, 1], linestyle="--", color="white", linewidth=0.9, label="y = x")
    ax.plot([0, 1], [0, 1], linestyle=(0, (2, 4)), color="black", linewidth=0.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks([0, 0.5, 1])
    ax.set_yticks([0, 0.5, 1])
    if title is not None:
        ax.set_title(title, fontsize=TITLE_PT)
    ax.tick_params(labelsize=SMALL_PT)
    return mesh


def _colour(cmap: str) -> Any:
    mpl = _import_matplotlib()
    try:
        return mpl.colormaps[cmap].with_extremes(bad="white")
    except KeyError as exc:
        raise ValueError(f"cmap must name a matplotlib colour map (e.g. 'viridis', 'cividis'), got {cmap!r}") from exc


def _check_histogram(histogram: Any) -> np.ndarray:
    h = _to_numpy(histogram, "histogram")
    if h.ndim != 3 or h.shape[1] != h.shape[2]:
        raise ValueError(f"histogram must have shape (C, M, M), got {tuple(h.shape)}")
    if h.shape[0] < 1 or h.shape[1] < 1:
        raise ValueError(f"histogram must have at least one class and one bin, got shape {tuple(h.shape)}")
    if np.any(h < 0) or not np.all(np.isfinite(h)):
        raise ValueError("histogram must hold finite non-negative counts")
    return h


def _heat_grid(
    cells: list[list[tuple[np.ndarray, np.ndarray | None, str | None] | None]],
    *,
    width: float,
    row_labels: Sequence[str] | None,
    count_label: str,
    gamma: float,
    cmap: str,
    title: str | None,
) -> Figure:
    """Heat maps in a grid (``cells[r][c]`` = (map, bars or None, title) or None for an empty cell), each with
    its count bars below when bars are given; one colour bar in its own column beside the first row."""
    from matplotlib.colors import PowerNorm

    nrows, ncols = len(cells), max(len(r) for r in cells)
    show_counts = any(cell is not None and cell[1] is not None for row in cells for cell in row)
    cbar_w = 0.06
    # the heat maps about square: panel width from the figure width less the margins (labels, colour bar)
    left = 0.55 + (0.14 if row_labels else 0.0)
    panel_w = max((width - left - 0.45) / (ncols + cbar_w), 0.5)
    bar_h = max(0.26 * panel_w, 0.42) if show_counts else 0.0
    height = nrows * (panel_w + bar_h + 0.2) + 0.3 + (0.25 if title else 0.0)
    fig = _new_figure(width, height)
    ratios: list[float] = []
    for _ in range(nrows):
        ratios += [panel_w, bar_h] if show_counts else [panel_w]
    gs = fig.add_gridspec(len(ratios), ncols + 1, height_ratios=ratios, width_ratios=[1.0] * ncols + [cbar_w])
    cm = _colour(cmap)
    norm = PowerNorm(gamma=gamma, vmin=0.0, vmax=1.0)
    mesh = None
    per_row = 2 if show_counts else 1
    for r, row in enumerate(cells):
        last_row = r == nrows - 1 or all(c >= len(cells[r + 1]) or cells[r + 1][c] is None for c in range(len(row)))
        for c, cell in enumerate(row):
            if cell is None:
                continue
            hmap, bars, name = cell
            ax = fig.add_subplot(gs[r * per_row, c])
            mesh = _draw_heat(ax, hmap, hmap.shape[-1], cm, norm, name)
            if c == 0:
                lab = "observed frequency"
                ax.set_ylabel(f"{row_labels[r]}\n{lab}" if row_labels else lab, fontsize=LABEL_PT)
            else:
                ax.tick_params(labelleft=False)
            below_is_last = last_row or c >= len(cells[r + 1]) or cells[r + 1][c] is None
            if show_counts and bars is not None:
                ax.tick_params(labelbottom=False)
                bax = fig.add_subplot(gs[r * per_row + 1, c], sharex=ax)
                _count_bars(bax, bars, count_label if c == 0 else None, xlabel=below_is_last)
            elif below_is_last:
                ax.set_xlabel("predicted probability", fontsize=LABEL_PT)
    cax = fig.add_subplot(gs[0, ncols], label="<colorbar>")  # as matplotlib labels the axes it makes for one
    cbar = fig.colorbar(mesh, cax=cax)
    cbar.set_label("fraction of images in column", fontsize=SMALL_PT)
    cbar.ax.tick_params(labelsize=SMALL_PT)
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_PT)
    return _finish(fig)


def dataset_reliability_histogram(
    histogram: Any,
    *,
    counts: Any | None = None,
    class_names: Sequence[str] | None = None,
    all_classes: bool = True,
    gamma: float = 0.5,
    cmap: str = HEAT_CMAP,
    show_counts: bool = True,
    ncols: int | None = None,
    width: str | float | None = None,
    panel_size: float | None = None,
    title: str | None = None,
    ax: Any | None = None,
    class_index: int | None = None,
) -> Figure:
    """Figure of a dataset reliability histogram ``H[c, a, j]`` (class, accuracy bin, confidence bin).

    One heat map per class (x: predicted probability, y: observed frequency; each confidence column
    normalised to sum to 1 over the accuracy bins; ``PowerNorm(gamma)`` colour scale on a perceptual
    colour map; the y = x diagonal dashed) and, when ``all_classes``, an "all classes" panel of the summed
    class maps. With ``show_counts`` a small bar chart under each map shows how much data each confidence
    bin holds: ``counts[c, j]`` when given (e.g. voxels per bin, ``DatasetCalibration.plot`` passes the
    pooled voxel counts), otherwise the number of (image, bin) entries ``Σ_a H[c, a, j]``; log scale. The bars
    share the heat map's x extent; the colour bar has a column of its own.

    Args:
        histogram: int (C, M, M) tensor/array, e.g. ``DatasetCalibration.histogram()``.
        counts: optional (C, M) per-class, per-confidence-bin amounts for the bars below the maps.
        class_names: C names for the panel titles (default ``"class k"``).
        all_classes: add the "all classes" panel.
        gamma: exponent of the power norm (< 1 brightens rare cells).
        cmap: a matplotlib colour map name (colour-blind-safe, perceptually uniform ones: viridis, cividis).
        show_counts: draw the count bars under each map.
        ncols: panels per row (default: all in one row up to 4, then rows of 4).
        width: figure width, ``"single"`` (3.5 in), ``"double"`` (7 in) or inches (default: single column for
            one panel, double column otherwise).
        panel_size: width of one panel in inches instead of ``width`` (the figure is then
            ``panel_size * ncols`` plus margins wide).
        title: optional figure title.
        ax: draw one heat map (with its colour bar, without count bars) into this matplotlib ``Axes`` instead
            of making a figure of panels (matplotlib / torchmetrics convention); returns ``ax.figure``.
        class_index: with ``ax``: which class to draw (default: the sum over classes, i.e. the only class
            when C = 1).

    Returns:
        a ``matplotlib.figure.Figure``; :func:`save_figure` writes it as PDF and 300-dpi PNG.
    """
    _import_matplotlib()
    from matplotlib.colors import PowerNorm

    h = _check_histogram(histogram)
    C, M = h.shape[0], h.shape[1]
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if class_names is None:
        class_names = [f"class {k}" for k in range(C)]
    class_names = [str(n) for n in class_names]
    if len(class_names) != C:
        raise ValueError(f"class_names has {len(class_names)} names for {C} classes")
    if counts is not None:
        cnt = _to_numpy(counts, "counts")
        if cnt.shape != (C, M):
            raise ValueError(f"counts must have shape (C, M) = {(C, M)}, got {tuple(cnt.shape)}")
        count_label = "voxels"
    else:
        cnt = h.sum(axis=1)
        count_label = "images"

    if ax is not None:
        if class_index is not None and not -C <= class_index < C:
            raise ValueError(f"class_index must be in [{-C}, {C}) for {C} classes, got {class_index}")
        one = h[class_index] if class_index is not None else h.sum(axis=0)
        name = class_names[class_index] if class_index is not None else (class_names[0] if C == 1 else "all classes")
        mesh = _draw_heat(ax, one, M, _colour(cmap), PowerNorm(gamma=gamma, vmin=0.0, vmax=1.0), title or name)
        ax.set_xlabel("predicted probability", fontsize=LABEL_PT)
        ax.set_ylabel("observed frequency", fontsize=LABEL_PT)
        cbar = ax.figure.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02)
        cbar.set_label("fraction of images in column", fontsize=SMALL_PT)
        cbar.ax.tick_params(labelsize=SMALL_PT)
        return _finish(ax.figure)

    maps = [h[c] for c in range(C)]
    bars = [cnt[c] for c in range(C)]
    names = list(class_names)
    if all_classes and C > 1:
        maps.append(h.sum(axis=0))
        bars.append(cnt.sum(axis=0))
        names.append("all classes")
    P = len(maps)
    if ncols is None:
        ncols = P if P <= 4 else 4
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, P)
    if panel_size is not None:
        if not panel_size > 0:
            raise ValueError(f"panel_size must be > 0 inches, got {panel_size}")
        fig_w = panel_size * ncols + 0.9
    else:
        fig_w = _figure_width(width if width is not None else ("single" if ncols == 1 else "double"))
    cells = [
        [(maps[k], bars[k] if show_counts else None, names[k]) for k in range(r, min(r + ncols, P))]
        for r in range(0, P, ncols)
    ]
    return _heat_grid(cells, width=fig_w, row_labels=None, count_label=count_label, gamma=gamma, cmap=cmap, title=title)


def comparison_grid(
    histograms: Sequence[Any],
    run_names: Sequence[str],
    *,
    counts: Sequence[Any | None] | None = None,
    class_names: Sequence[str] | None = None,
    all_classes: bool = True,
    gamma: float = 0.5,
    cmap: str = HEAT_CMAP,
    width: str | float = "double",
    title: str | None = None,
) -> Figure:
    """Several runs' dataset reliability histograms side by side: a row per run, a column per class and (with
    ``all_classes`` and more than one class) the "all classes" column, each map with its count bars; one colour
    scale for all (``calibops compare``).

    Args:
        histograms: one (C, M, M) histogram per run (the same C and M for every run).
        run_names: one name per run (row labels).
        counts: per run an optional (C, M) array of voxels per confidence bin (else (image, bin) entries).
        class_names: C column titles (default ``"class k"``).
        all_classes, gamma, cmap, title: as in :func:`dataset_reliability_histogram`.
        width: ``"single"``, ``"double"`` (default) or inches.
    """
    _import_matplotlib()
    hs = [_check_histogram(h) for h in histograms]
    if not hs:
        raise ValueError("histograms must hold at least one run")
    if len(run_names) != len(hs):
        raise ValueError(f"run_names has {len(run_names)} names for {len(hs)} runs")
    shape = hs[0].shape
    for name, h in zip(run_names, hs, strict=True):
        if h.shape != shape:
            raise ValueError(
                f"run {name!r} has a histogram of shape {h.shape}, the first run {shape}; compare runs "
                "with the same classes and bins"
            )
    C, M = shape[0], shape[1]
    names = [str(n) for n in class_names] if class_names is not None else [f"class {k}" for k in range(C)]
    if len(names) != C:
        raise ValueError(f"class_names has {len(names)} names for {C} classes")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    counts = list(counts) if counts is not None else [None] * len(hs)
    if len(counts) != len(hs):
        raise ValueError(f"counts has {len(counts)} entries for {len(hs)} runs")
    voxels = all(c is not None for c in counts)
    cells = []
    for r, h in enumerate(hs):
        cnt = _to_numpy(counts[r], "counts") if voxels else h.sum(axis=1)
        if cnt.shape != (C, M):
            raise ValueError(f"counts of run {run_names[r]!r} must have shape {(C, M)}, got {tuple(cnt.shape)}")
        row = [(h[c], cnt[c], names[c] if r == 0 else None) for c in range(C)]
        if all_classes and C > 1:
            row.append((h.sum(axis=0), cnt.sum(axis=0), "all classes" if r == 0 else None))
        cells.append(row)
    return _heat_grid(
        cells,
        width=_figure_width(width),
        row_labels=[str(n) for n in run_names],
        count_label="voxels" if voxels else "images",
        gamma=gamma,
        cmap=cmap,
        title=title,
    )


def _select(x: Any, image: int, class_index: int, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim == 3:
        return a[image, class_index]
    if a.ndim == 2:
        return a[class_index]
    if a.ndim == 1:
        return a
    raise ValueError(f"{name} must have shape (M,), (C, M) or (B, C, M), got {tuple(a.shape)}")


def _stats_triple(stats: Any) -> tuple[Any, Any, Any]:
    if all(hasattr(stats, a) for a in ("count", "sum_p", "sum_y")):
        return stats.count, stats.sum_p, stats.sum_y
    if isinstance(stats, (tuple, list)) and len(stats) == 3:
        return tuple(stats)
    raise TypeError("stats must be a BinnedStats (count, sum_p, sum_y) or a 3-tuple of tensors/arrays")


def _errors(n: np.ndarray, sp: np.ndarray, sy: np.ndarray) -> tuple[float, float, float]:
    from .results import BinnedStats, calibration_errors_from_stats

    M = n.shape[0]
    t = [torch.as_tensor(v, dtype=torch.float64).reshape(1, 1, M) for v in (n, sp, sy)]
    errs = calibration_errors_from_stats(BinnedStats(*t))
    return tuple(float(e.reshape(-1)[0]) for e in errs)  # type: ignore[return-value]


def _gap_diagram(ax: Any, n: np.ndarray, sp: np.ndarray, sy: np.ndarray, *, classic: bool, note: str) -> None:
    """A reliability diagram into ``ax``: per non-empty bin the observed frequency (classic: a bar from 0, else a
    tick), the gap to the mean confidence shaded, the diagonal and ``note`` in the corner."""
    M = n.shape[0]
    valid = n > 0
    den = np.where(valid, n, 1.0)
    conf = np.where(valid, sp / den, np.nan)
    acc = np.where(valid, sy / den, np.nan)
    edges = _edges(M)
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = 1.0 / M
    if classic:
        ax.bar(
            centres[valid],
            acc[valid],
            width=width,
            color=_ACC_COLOUR,
            alpha=0.75,
            edgecolor="white",
            linewidth=0.3,
            label="observed frequency",
        )
    lo = np.fmin(conf, acc)
    gap = np.abs(conf - acc)[valid]
    if classic:  # hatched over the bars: no colour blend that reads as a third colour
        ax.bar(
            centres[valid],
            gap,
            bottom=lo[valid],
            width=width,
            facecolor="none",
            edgecolor=_GAP_COLOUR,
            hatch="////",
            linewidth=0.6,
            label="gap",
        )
    else:
        ax.bar(
            centres[valid],
            gap,
            bottom=lo[valid],
            width=width * 0.9,
            color=_GAP_COLOUR,
            alpha=0.35,
            edgecolor=_GAP_COLOUR,
            linewidth=0.5,
            label="gap",
        )
    if not classic:
        ax.scatter(
            centres[valid],
            acc[valid],
            marker="_",
            s=60,
            color="black",
            linewidths=1.2,
            label="observed frequency",
            zorder=3,
        )
    ax.scatter(centres[valid], conf[valid], marker=".", s=10, color=_CONF_COLOUR, label="mean confidence", zorder=3)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticks([0, 0.5, 1])
    ax.set_yticks([0, 0.5, 1])
    ax.set_ylabel("observed frequency", fontsize=LABEL_PT)
    ax.tick_params(labelsize=SMALL_PT)
    ax.text(
        0.03,
        0.97,
        note,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=SMALL_PT,
        family="monospace",
        bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )
    ax.legend(
        loc="lower right",
        fontsize=SMALL_PT,
        frameon=classic,
        framealpha=0.85,
        edgecolor="0.7",
        handlelength=1.0,
        borderaxespad=0.3,
    )


def reliability_diagram(
    stats: Any,
    *,
    image: int = 0,
    class_index: int = 0,
    title: str | None = None,
    show_counts: bool = True,
    figsize: tuple[float, float] | None = None,
    ax: Any | None = None,
) -> Figure:
    """Reliability diagram of one image and class from its binned statistics.

    For every non-empty confidence bin j (hard bins of ``calibops.functional.binned_stats``): a gap bar at
    the bin centre spanning mean confidence ``S_p/n`` to observed frequency ``S_y/n``, a tick at the
    observed frequency, the y = x diagonal, ECE/ACE/MCE (from ``calibops.reference``) in the corner, and
    the voxel count per bin (log scale) below, sharing the diagram's x extent.

    Args:
        stats: ``BinnedStats`` (or any object with ``count``, ``sum_p``, ``sum_y``, or a 3-tuple), each
            (M,), (C, M) or (B, C, M).
        image: which image when the statistics have a batch dimension.
        class_index: which class when they have a class dimension (index into the statistics' classes).
        title: panel title (default ``"image {image}, class {class_index}"``).
        show_counts: draw the count histogram below.
        figsize: figure size in inches (default: single column, 3.5 in wide).
        ax: draw into this matplotlib ``Axes`` (no count panel) and return ``ax.figure``.
    """
    _import_matplotlib()
    count, sum_p, sum_y = _stats_triple(stats)
    n = _select(count, image, class_index, "count")
    sp = _select(sum_p, image, class_index, "sum_p")
    sy = _select(sum_y, image, class_index, "sum_y")
    if not (n.shape == sp.shape == sy.shape):
        raise ValueError(f"count, sum_p, sum_y shapes differ: {n.shape}, {sp.shape}, {sy.shape}")
    ece, ace, mce = _errors(n, sp, sy)
    w, hgt = figsize if figsize is not None else (SINGLE_COLUMN, SINGLE_COLUMN * (1.18 if show_counts else 0.95))
    if ax is not None:
        fig, show_counts = ax.figure, False
    else:
        fig = _new_figure(w, hgt)
        if show_counts:
            gs = fig.add_gridspec(2, 1, height_ratios=[4.0, 1.0])
            ax = fig.add_subplot(gs[0])
        else:
            ax = fig.add_subplot(1, 1, 1)
    _gap_diagram(ax, n, sp, sy, classic=False, note=f"ECE {ece:.4f}\nACE {ace:.4f}\nMCE {mce:.4f}")
    ax.set_title(title if title is not None else f"image {image}, class {class_index}", fontsize=TITLE_PT)
    if show_counts:
        bax = fig.add_subplot(gs[1], sharex=ax)
        ax.tick_params(labelbottom=False)
        _count_bars(bax, n, "voxels", xlabel=True)
    else:
        ax.set_xlabel("predicted probability", fontsize=LABEL_PT)
    return _finish(fig)


def pooled_reliability(
    stats: Any,
    histogram: Any,
    *,
    class_index: int | None = None,
    class_names: Sequence[str] | None = None,
    gamma: float = 0.5,
    cmap: str = HEAT_CMAP,
    title: str | None = None,
    width: str | float = "double",
) -> Figure:
    """The classic pooled reliability diagram with its confidence histogram, beside the dataset reliability
    histogram of the same class: what a pooled diagram averages away, the histogram shows as spread.

    Left: per confidence bin the observed frequency of all pooled voxels (bars), the gap to their mean
    confidence (shaded), the diagonal and the micro (pooled) ECE / ACE / MCE; under it the confidence histogram
    (voxels per bin, log scale). Right: the dataset reliability histogram (per-image bin accuracies, column
    normalised) with the same voxel counts under it; one colour bar in its own column.

    Args:
        stats: pooled statistics, a ``BinnedStats`` or ``(count, sum_p, sum_y)`` of (C, M) arrays, e.g.
            ``DatasetCalibration.pooled_stats()``.
        histogram: (C, M, M), e.g. ``DatasetCalibration.histogram()`` (a (M, M) top-label histogram is taken as
            C = 1).
        class_index: which class (default: all classes pooled; the only class when C = 1).
        class_names: C names (for the title).
        gamma, cmap: the heat map's colour scale (as in :func:`dataset_reliability_histogram`).
        title: figure title (default: the class name).
        width: ``"double"`` (7 in, default), ``"single"`` or inches.
    """
    _import_matplotlib()
    from matplotlib.colors import PowerNorm

    h = _to_numpy(histogram, "histogram")
    if h.ndim == 2:
        h = h[None]
    h = _check_histogram(h)
    C, M = h.shape[0], h.shape[1]
    count, sum_p, sum_y = (_to_numpy(t, name) for t, name in zip(_stats_triple(stats), ("count", "sum_p", "sum_y")))
    count, sum_p, sum_y = (a[None] if a.ndim == 1 else a for a in (count, sum_p, sum_y))
    for a, name in ((count, "count"), (sum_p, "sum_p"), (sum_y, "sum_y")):
        if a.shape != (C, M):
            raise ValueError(f"stats.{name} must have shape (C, M) = {(C, M)} like the histogram, got {a.shape}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    names = [str(n) for n in class_names] if class_names is not None else [f"class {k}" for k in range(C)]
    if len(names) != C:
        raise ValueError(f"class_names has {len(names)} names for {C} classes")
    if class_index is None:
        sel = slice(None)
        name = names[0] if C == 1 else "all classes"
    else:
        if not -C <= class_index < C:
            raise ValueError(f"class_index must be in [{-C}, {C}) for {C} classes, got {class_index}")
        sel = slice(class_index % C, class_index % C + 1)
        name = names[class_index]
    n, sp, sy = (a[sel].sum(axis=0) for a in (count, sum_p, sum_y))
    hmap = h[sel].sum(axis=0)
    fig_w = _figure_width(width)
    panel_w = (fig_w - 1.3) / 2.06
    bar_h = max(0.26 * panel_w, 0.42)
    fig = _new_figure(fig_w, panel_w + bar_h + 0.95)
    gs = fig.add_gridspec(2, 3, height_ratios=[panel_w, bar_h], width_ratios=[1.0, 1.0, 0.06])
    ax = fig.add_subplot(gs[0, 0])
    ece, ace, mce = _errors(n, sp, sy)
    _gap_diagram(ax, n, sp, sy, classic=True, note=f"micro\nECE {ece:.4f}\nACE {ace:.4f}\nMCE {mce:.4f}")
    ax.set_title("pooled reliability diagram", fontsize=TITLE_PT)
    ax.tick_params(labelbottom=False)
    _count_bars(fig.add_subplot(gs[1, 0], sharex=ax), n, "voxels", xlabel=True)
    hax = fig.add_subplot(gs[0, 1])
    mesh = _draw_heat(
        hax, hmap, M, _colour(cmap), PowerNorm(gamma=gamma, vmin=0.0, vmax=1.0), "dataset reliability histogram"
    )
    hax.tick_params(labelbottom=False)
    _count_bars(fig.add_subplot(gs[1, 1], sharex=hax), n, None, xlabel=True)
    cbar = fig.colorbar(mesh, cax=fig.add_subplot(gs[0, 2], label="<colorbar>"))
    cbar.set_label("fraction of images in column", fontsize=SMALL_PT)
    cbar.ax.tick_params(labelsize=SMALL_PT)
    fig.suptitle(title if title is not None else name, fontsize=SUPTITLE_PT)
    return _finish(fig)
