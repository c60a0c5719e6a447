"""Reporting of dataset results: reliability panels side by side (groups, classes, pooled classification) and
the dataset reliability histogram of a :class:`calibops.DatasetCalibration`.

Drawn from the summed state (pooled hard statistics: count, sum_p, sum_y per bin, and the histogram); the
figure primitives (the per-image reliability diagram, the dataset reliability histogram) live in
:mod:`calibops.plot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..results import BinnedStats, calibration_errors_from_stats
from .config import MetricConfig

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["dataset_histogram", "group_panels", "pooled_panels", "reliability_panels"]

State = dict[str, torch.Tensor]


def _np(t: Any) -> np.ndarray:
    return torch.as_tensor(t).detach().double().cpu().numpy()


def reliability_panels(
    stats: Sequence[BinnedStats],
    titles: Sequence[str],
    *,
    rows: int | None = None,
    width: str | float | None = None,
    suptitle: str | None = None,
) -> Figure:
    """One reliability panel per entry of ``stats`` (each a pooled ``BinnedStats`` of (M,) tensors), in a
    ``rows`` x ceil(n / rows) grid sharing the axes (default: rows of up to 4): bin accuracy against mean
    confidence (bars at the bin centres), the gap shaded, the diagonal, the pooled count per bin as bar opacity,
    ECE / L2 / MCE in the corner. The style of :mod:`calibops.plot`: single column (3.5 in) for one or two panels,
    double column (7 in) otherwise (``width`` overrides), fonts of at least 7 pt, Okabe-Ito colours.
    """
    from ..plot import (
        _ACC_COLOUR,
        _GAP_COLOUR,
        LABEL_PT,
        SMALL_PT,
        SUPTITLE_PT,
        TITLE_PT,
        _figure_width,
        _finish,
        _import_matplotlib,
        _new_figure,
    )

    _import_matplotlib()
    n = len(stats)
    if n == 0 or len(titles) != n:
        raise ValueError(f"need one title per panel, got {n} panels and {len(titles)} titles")
    if rows is None:
        rows = -(-n // 4)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    cols = -(-n // rows)
    fig_w = _figure_width(width if width is not None else ("single" if cols <= 2 else "double"))
    panel = (fig_w - 0.5) / cols
    fig = _new_figure(fig_w, rows * (panel + 0.2) + 0.45 + (0.2 if suptitle else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for i, (s, title) in enumerate(zip(stats, titles, strict=True)):
        ax = axes[i // cols][i % cols]
        count, sp, sy = (_np(t) for t in (s.count, s.sum_p, s.sum_y))
        M = count.shape[-1]
        valid = count > 0
        den = np.where(valid, count, 1.0)
        conf, acc = sp / den, sy / den
        centres = (np.arange(M) + 0.5) / M
        alpha = np.where(valid, 0.25 + 0.75 * count / max(count.max(), 1.0), 0.0)
        for j in np.flatnonzero(valid):
            ax.bar(centres[j], acc[j], width=0.9 / M, color=_ACC_COLOUR, alpha=float(alpha[j]), edgecolor="none")
            lo, hi = sorted((conf[j], acc[j]))
            ax.bar(
                centres[j],
                hi - lo,
                bottom=lo,
                width=0.9 / M,
                facecolor="none",
                edgecolor=_GAP_COLOUR,
                hatch="////",
                linewidth=0.5,
            )
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=0.8)
        e = calibration_errors_from_stats(BinnedStats(*(torch.as_tensor(v).view(1, M) for v in (count, sp, sy))))
        ax.text(
            0.03,
            0.97,
            f"ECE {float(e.ece[0]):.4f}\nL2  {float(e.l2[0]):.4f}\nMCE {float(e.mce[0]):.4f}\nn {int(count.sum())}",
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=SMALL_PT,
            family="monospace",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        ax.set_title(str(title), fontsize=TITLE_PT)
        ax.tick_params(labelsize=SMALL_PT)
    for i in range(n, rows * cols):
        fig.delaxes(axes[i // cols][i % cols])
    for i in range(max(0, n - cols), n):  # a panel with no panel below it shows its x tick labels
        axes[i // cols][i % cols].tick_params(labelbottom=True)
    fig.supxlabel("predicted probability", fontsize=LABEL_PT)
    fig.supylabel("observed frequency", fontsize=LABEL_PT)
    if suptitle:
        fig.suptitle(suptitle, fontsize=SUPTITLE_PT)
    return _finish(fig)


def _row_titles(cfg: MetricConfig, class_names: Sequence[str] | None) -> list[str]:
    """One title per statistic row: ``class_names`` given per used class (C') or per input class (C, the
    background name then dropped), else ``"class c"`` (``"top-label"`` for top-label)."""
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) == cfg.num_classes and cfg.num_used_classes != cfg.num_classes:
            names = [names[c] for c in cfg.classes]
        return names
    return ["top-label"] if cfg.mode == "top_label" else [f"class {c}" for c in cfg.classes]


def group_panels(cfg: MetricConfig, s: State, names: Sequence[Any], class_index: int, title: str | None) -> Figure:
    """The groups' pooled reliability diagrams (one panel per group) for one used class (``class_index``)."""
    k = 0 if cfg.mode == "top_label" else class_index
    if not 0 <= k < cfg.num_used_classes:
        raise ValueError(f"class_index must lie in [0, {cfg.num_used_classes}), got {class_index}")
    stats = [
        BinnedStats(s["group_count"][g, k], s["group_sum_p"][g, k], s["group_sum_y"][g, k]) for g in range(len(names))
    ]
    what = "top-label" if cfg.mode == "top_label" else f"class {cfg.classes[k]}"
    return reliability_panels(stats, [str(n) for n in names], suptitle=title or what)


def pooled_panels(cfg: MetricConfig, s: State, class_names: Sequence[str] | None) -> Figure:
    """Classification: the reliability diagram of the pooled samples, one panel per class (one, top-label)."""
    titles = ["top-label"] if cfg.mode == "top_label" else _row_titles(cfg, class_names)
    if len(titles) != cfg.num_used_classes:
        raise ValueError(f"class_names: need one name per class, got {class_names}")
    stats = [BinnedStats(s["count"][k], s["sum_p"][k], s["sum_y"][k]) for k in range(cfg.num_used_classes)]
    return reliability_panels(stats, titles, suptitle="pooled samples")


def dataset_histogram(cfg: MetricConfig, s: State, class_names: Sequence[str] | None, **kwargs: Any) -> Figure:
    """The dataset reliability histogram figure of the summed state
    (:func:`calibops.plot.dataset_reliability_histogram`), pooled voxels per confidence bin as the bars below."""
    from ..plot import dataset_reliability_histogram

    names = _row_titles(cfg, class_names)
    if cfg.mode == "top_label" and len(names) != 1:
        raise ValueError(f"class_names: a top-label histogram has one row; pass one name or None, got {names}")
    return dataset_reliability_histogram(s["hist"], counts=s["count"], class_names=names, **kwargs)
