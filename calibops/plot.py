"""Matplotlib figures: the dataset reliability histogram and the per-image reliability diagram.

matplotlib is an optional dependency (extra ``plot``) imported only when a figure is made. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot state, safe in loops and without a display) and are
vector-friendly: heat maps are drawn with ``pcolormesh``, so ``fig.savefig("x.pdf")`` gives vector output
and ``fig.savefig("x.png", dpi=300)`` a raster for slides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["column_normalise", "dataset_reliability_histogram", "reliability_diagram"]

_EPS32 = float(torch.finfo(torch.float32).eps)


def _import_matplotlib():
    try:
        import matplotlib
        import matplotlib.colors
        import matplotlib.figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "calibops.plot needs matplotlib, an optional dependency of calibops: "
            "pip install 'calibops[plot]' (or pip install matplotlib)"
        ) from exc
    return matplotlib


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
    # The bin edges (README "Semantics") end at 1 + eps32; draw them ending at 1 so the axes read 0..1.
    e = np.linspace(0.0, 1.0, num_bins + 1)
    return e


def dataset_reliability_histogram(
    histogram: Any,
    *,
    counts: Any | None = None,
    class_names: Sequence[str] | None = None,
    all_classes: bool = True,
    gamma: float = 0.5,
    cmap: str = "viridis",
    show_counts: bool = True,
    ncols: int | None = None,
    panel_size: float = 2.4,
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
    pooled voxel counts), otherwise the number of (image, bin) entries ``Σ_a H[c, a, j]``; log scale.

    Args:
        histogram: int (C, M, M) tensor/array, e.g. ``DatasetCalibration.histogram()``.
        counts: optional (C, M) per-class, per-confidence-bin amounts for the bars below the maps.
        class_names: C names for the panel titles (default ``"class k"``).
        all_classes: add the "all classes" panel.
        gamma: exponent of the power norm (< 1 brightens rare cells).
        cmap: a matplotlib colour map name (perceptually uniform ones: viridis, magma, cividis).
        show_counts: draw the count bars under each map.
        ncols: panels per row (default: all in one row up to 4, then rows of 4).
        panel_size: width of one panel in inches.
        title: optional figure title.
        ax: draw one heat map (with its colour bar, without count bars) into this matplotlib ``Axes`` instead
            of making a figure of panels (matplotlib / torchmetrics convention); returns ``ax.figure``.
        class_index: with ``ax``: which class to draw (default: the sum over classes, i.e. the only class
            when C = 1).

    Returns:
        a ``matplotlib.figure.Figure``; save it with ``fig.savefig("hist.pdf")`` / ``("hist.png", dpi=300)``.
    """
    mpl = _import_matplotlib()
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    h = _to_numpy(histogram, "histogram")
    if h.ndim != 3 or h.shape[1] != h.shape[2]:
        raise ValueError(f"histogram must have shape (C, M, M), got {tuple(h.shape)}")
    C, M = h.shape[0], h.shape[1]
    if C < 1 or M < 1:
        raise ValueError(f"histogram must have at least one class and one bin, got shape {tuple(h.shape)}")
    if np.any(h < 0) or not np.all(np.isfinite(h)):
        raise ValueError("histogram must hold finite non-negative counts")
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
        cm = mpl.colormaps[cmap].with_extremes(bad="white")
        mesh = _draw_heat(ax, one, M, cm, PowerNorm(gamma=gamma, vmin=0.0, vmax=1.0), title or name)
        ax.set_xlabel("predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        cbar = ax.figure.colorbar(mesh, ax=ax, shrink=0.85, pad=0.02)
        cbar.set_label("fraction of images in column", fontsize=8)
        return ax.figure

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
    nrows = math.ceil(P / ncols)

    height_ratios: list[float] = []
    for _ in range(nrows):
        height_ratios += [4.0, 1.0] if show_counts else [4.0]
    fig_w = panel_size * ncols + 0.9
    fig_h = panel_size * nrows * (1.3 if show_counts else 1.0) + (0.4 if title else 0.0)
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    gs = fig.add_gridspec(len(height_ratios), ncols, height_ratios=height_ratios)

    cm = mpl.colormaps[cmap].with_extremes(bad="white")
    norm = PowerNorm(gamma=gamma, vmin=0.0, vmax=1.0)
    edges = _edges(M)
    centres = 0.5 * (edges[:-1] + edges[1:])
    mesh = None
    heat_axes = []
    for k in range(P):
        r, col = divmod(k, ncols)
        row = r * (2 if show_counts else 1)
        ax = fig.add_subplot(gs[row, col])
        heat_axes.append(ax)
        mesh = _draw_heat(ax, maps[k], M, cm, norm, names[k])
        if col == 0:
            ax.set_ylabel("observed frequency", fontsize=8)
        if show_counts:
            ax.tick_params(labelbottom=False)
            bax = fig.add_subplot(gs[row + 1, col], sharex=ax)
            b = np.asarray(bars[k], dtype=np.float64)
            bax.bar(centres, np.where(b > 0, b, np.nan), width=1.0 / M, color="0.45", edgecolor="none")
            if np.any(b > 0):
                _log_counts(bax)
            bax.set_xlim(0, 1)
            bax.tick_params(labelsize=6)
            bax.set_xlabel("predicted probability", fontsize=8)
            if col == 0:
                bax.set_ylabel(count_label, fontsize=7)
        else:
            ax.set_xlabel("predicted probability", fontsize=8)
    cbar = fig.colorbar(mesh, ax=heat_axes, shrink=0.85, pad=0.02)
    cbar.set_label("fraction of images in column", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _draw_heat(ax: Any, hmap: np.ndarray, M: int, cm: Any, norm: Any, title: str) -> Any:
    """One column-normalised heat map with the y = x diagonal into ``ax``; returns the mesh."""
    edges = _edges(M)
    data = np.ma.masked_invalid(column_normalise(hmap))
    mesh = ax.pcolormesh(edges, edges, data, cmap=cm, norm=norm, shading="flat", rasterized=False)
    ax.plot([0, 1], [0, 1], linestyle="--", color="white", linewidth=0.9, label="y = x")
    ax.plot([0, 1], [0, 1], linestyle=(0, (2, 4)), color="black", linewidth=0.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    return mesh


def _select(x: Any, image: int, class_index: int, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.ndim == 3:
        return a[image, class_index]
    if a.ndim == 2:
        return a[class_index]
    if a.ndim == 1:
        return a
    raise ValueError(f"{name} must have shape (M,), (C, M) or (B, C, M), got {tuple(a.shape)}")


def reliability_diagram(
    stats: Any,
    *,
    image: int = 0,
    class_index: int = 0,
    title: str | None = None,
    show_counts: bool = True,
    figsize: tuple[float, float] = (3.4, 4.2),
    ax: Any | None = None,
) -> Figure:
    """Reliability diagram of one image and class from its binned statistics.

    For every non-empty confidence bin j (hard bins of ``calibops.functional.binned_stats``): a gap bar at
    the bin centre spanning mean confidence ``S_p/n`` to observed frequency ``S_y/n``, a tick at the
    observed frequency, the y = x diagonal, ECE/ACE/MCE (from ``calibops.reference``) in the corner, and
    the voxel count per bin (log scale) below.

    Args:
        stats: ``BinnedStats`` (or any object with ``count``, ``sum_p``, ``sum_y``, or a 3-tuple), each
            (M,), (C, M) or (B, C, M).
        image: which image when the statistics have a batch dimension.
        class_index: which class when they have a class dimension (index into the statistics' classes).
        title: panel title (default ``"image {image}, class {class_index}"``).
        show_counts: draw the count histogram below.
        figsize: figure size in inches.
        ax: draw into this matplotlib ``Axes`` (no count panel) and return ``ax.figure``.
    """
    _import_matplotlib()
    from matplotlib.figure import Figure

    from .results import BinnedStats, calibration_errors_from_stats

    if all(hasattr(stats, a) for a in ("count", "sum_p", "sum_y")):
        count, sum_p, sum_y = stats.count, stats.sum_p, stats.sum_y
    elif isinstance(stats, (tuple, list)) and len(stats) == 3:
        count, sum_p, sum_y = stats
    else:
        raise TypeError("stats must be a BinnedStats (count, sum_p, sum_y) or a 3-tuple of tensors/arrays")
    n = _select(count, image, class_index, "count")
    sp = _select(sum_p, image, class_index, "sum_p")
    sy = _select(sum_y, image, class_index, "sum_y")
    if not (n.shape == sp.shape == sy.shape):
        raise ValueError(f"count, sum_p, sum_y shapes differ: {n.shape}, {sp.shape}, {sy.shape}")
    M = n.shape[0]
    t = [torch.as_tensor(v, dtype=torch.float64).reshape(1, 1, M) for v in (n, sp, sy)]
    errs = calibration_errors_from_stats(BinnedStats(*t))
    ece, ace, mce = (float(e.reshape(-1)[0]) for e in errs)

    valid = n > 0
    den = np.where(valid, n, 1.0)
    conf = np.where(valid, sp / den, np.nan)
    acc = np.where(valid, sy / den, np.nan)
    edges = _edges(M)
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = 1.0 / M

    if ax is not None:
        fig, show_counts = ax.figure, False
    elif show_counts:
        fig = Figure(figsize=figsize, layout="constrained")
        gs = fig.add_gridspec(2, 1, height_ratios=[4.0, 1.0])
        ax = fig.add_subplot(gs[0])
    else:
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
    lo = np.fmin(conf, acc)
    gap = np.abs(conf - acc)
    ax.bar(
        centres[valid],
        gap[valid],
        bottom=lo[valid],
        width=width * 0.9,
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        linewidth=0.6,
        label="gap",
    )
    ax.scatter(
        centres[valid],
        acc[valid],
        marker="_",
        s=120,
        color="black",
        linewidths=1.5,
        label="observed frequency",
        zorder=3,
    )
    ax.scatter(centres[valid], conf[valid], marker=".", s=12, color="tab:blue", label="mean confidence", zorder=3)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_ylabel("observed frequency", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title if title is not None else f"image {image}, class {class_index}", fontsize=9)
    ax.text(
        0.03,
        0.97,
        f"ECE {ece:.4f}\nACE {ace:.4f}\nMCE {mce:.4f}",
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=7,
        family="monospace",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )
    ax.legend(loc="lower right", fontsize=6, frameon=False)
    if show_counts:
        ax.tick_params(labelbottom=False)
        bax = fig.add_subplot(gs[1], sharex=ax)
        bax.bar(centres, np.where(valid, n, np.nan), width=width * 0.9, color="0.45")
        if np.any(valid):
            _log_counts(bax)
        bax.set_xlabel("predicted probability", fontsize=8)
        bax.set_ylabel("voxels", fontsize=7)
        bax.tick_params(labelsize=6)
    else:
        ax.set_xlabel("predicted probability", fontsize=8)
    return fig
