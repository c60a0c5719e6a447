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
    rows: int = 1,
    panel_size: tuple[float, float] = (2.6, 3.0),
    suptitle: str | None = None,
) -> Figure:
    """One reliability panel per entry of ``stats`` (each a pooled ``BinnedStats`` of (M,) tensors), in a
    ``rows`` x ceil(n / rows) grid sharing the axes: bin accuracy against mean confidence (bars at the bin
    centres), the gap shaded, the diagonal, the pooled count per bin as bar opacity, ECE / L2 / MCE in the corner.
    """
    from ..plot import _import_matplotlib

    _import_matplotlib()
    from matplotlib.figure import Figure

    n = len(stats)
    if n == 0 or len(titles) != n:
        raise ValueError(f"need one title per panel, got {n} panels and {len(titles)} titles")
    cols = -(-n // rows)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
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
            ax.bar(centres[j], acc[j], width=0.9 / M, color="tab:blue", alpha=float(alpha[j]), edgecolor="none")
            lo, hi = sorted((conf[j], acc[j]))
            ax.bar(centres[j], hi - lo, bottom=lo, width=0.9 / M, color="tab:red", alpha=0.3, edgecolor="none")
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=0.8)
        e = calibration_errors_from_stats(BinnedStats(*(torch.as_tensor(v).view(1, M) for v in (count, sp, sy))))
        ax.text(
            0.03,
            0.97,
            f"ECE {float(e.ece[0]):.4f}\nL2  {float(e.l2[0]):.4f}\nMCE {float(e.mce[0]):.4f}\nn {int(count.sum())}",
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7,
            family="monospace",
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(str(title), fontsize=9)
        ax.tick_params(labelsize=7)
    for i in range(n, rows * cols):
        axes[i // cols][i % cols].set_visible(False)
    fig.supxlabel("confidence", fontsize=8)
    fig.supylabel("observed frequency", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


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
