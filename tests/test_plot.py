"""Figures: the dataset reliability histogram and the per-image reliability diagram.

The checks read the figure's content (panels, titles, the drawn, column-normalised data, the colour norm,
the diagonal, the count bars, the corner text) rather than only that something was drawn, and save it to
PNG (raster) and PDF/SVG (vector).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.collections import QuadMesh  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402

from calibops import functional as F  # noqa: E402
from calibops.metrics import DatasetCalibration  # noqa: E402
from calibops.plot import column_normalise, dataset_reliability_histogram, reliability_diagram  # noqa: E402


def _metric(C=4, M=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = DatasetCalibration(C, num_bins=M, include_background=False, to_onehot_y=True, softmax=True)
    for size in ((12, 10), (8, 9)):
        m.update(torch.randn(3, C, *size, generator=g) * 2, torch.randint(0, C, (3, *size), generator=g))
    return m


def _heat_axes(fig):
    return [
        ax for ax in fig.axes if ax.get_label() != "<colorbar>" and any(isinstance(c, QuadMesh) for c in ax.collections)
    ]


def _mesh(ax) -> QuadMesh:
    return next(c for c in ax.collections if isinstance(c, QuadMesh))


def _has_diagonal(ax) -> bool:
    return any(np.allclose(line.get_xdata(), [0, 1]) and np.allclose(line.get_ydata(), [0, 1]) for line in ax.lines)


def test_dataset_histogram_figure_content(tmp_path):
    m = _metric()
    H = m.histogram()
    fig = m.plot(class_names=["background", "liver", "kidney", "spleen"], gamma=0.4)
    heat = _heat_axes(fig)
    assert [ax.get_title() for ax in heat] == ["liver", "kidney", "spleen", "all classes"]
    maps = [H[0], H[1], H[2], H.sum(0)]
    for ax, h in zip(heat, maps, strict=True):
        mesh = _mesh(ax)
        data = np.ma.getdata(mesh.get_array()).reshape(10, 10)  # rows: accuracy bins, cols: confidence
        mask = np.ma.getmaskarray(mesh.get_array()).reshape(10, 10)
        cols = h.sum(0).numpy()
        # every non-empty confidence column sums to 1; empty columns are masked (background)
        np.testing.assert_allclose(data[:, cols > 0].sum(0), 1.0, atol=1e-12)
        assert mask[:, cols == 0].all() and not mask[:, cols > 0].any()
        np.testing.assert_allclose(data[:, cols > 0], (h / h.sum(0).clamp(min=1)).numpy()[:, cols > 0])
        assert isinstance(mesh.norm, PowerNorm) and mesh.norm.gamma == 0.4
        assert mesh.norm.vmin == 0 and mesh.norm.vmax == 1
        assert _has_diagonal(ax)
        assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
    # count bars under each panel: pooled voxels per confidence bin
    bar_axes = [ax for ax in fig.axes if ax not in heat and ax.patches]
    assert len(bar_axes) == 4
    heights = np.array([p.get_height() for p in bar_axes[0].patches])
    np.testing.assert_allclose(np.nan_to_num(heights), m.pooled_counts()[0].numpy())
    assert bar_axes[0].get_yscale() == "log"
    # a colour bar
    assert any("fraction" in ax.get_ylabel() for ax in fig.axes)
    for ext in ("png", "pdf", "svg"):
        fig.savefig(tmp_path / f"h.{ext}")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "h.svg").read_bytes()[:1000]


def test_dataset_histogram_options():
    H = torch.zeros(2, 5, 5, dtype=torch.int64)
    H[0, 1, 1] = 3
    H[1, 4, 4] = 2
    fig = dataset_reliability_histogram(H, show_counts=False, all_classes=False)
    assert len(fig.axes) == 2 + 1  # two maps and the colour bar, no count bars
    assert [ax.get_title() for ax in _heat_axes(fig)] == ["class 0", "class 1"]
    fig = dataset_reliability_histogram(H, ncols=1)
    assert len(_heat_axes(fig)) == 3
    # one class: no "all classes" panel (it would repeat the map)
    assert len(_heat_axes(dataset_reliability_histogram(H[:1]))) == 1


def test_column_normalise():
    h = np.array([[[1, 0], [3, 0]]])
    out = column_normalise(h)
    np.testing.assert_allclose(out[0, :, 0], [0.25, 0.75])
    assert np.isnan(out[0, :, 1]).all()


def test_dataset_histogram_bad_input():
    with pytest.raises(ValueError, match="shape"):
        dataset_reliability_histogram(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="class_names"):
        dataset_reliability_histogram(torch.zeros(2, 5, 5), class_names=["a"])
    with pytest.raises(ValueError, match="counts"):
        dataset_reliability_histogram(torch.zeros(2, 5, 5), counts=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-negative"):
        dataset_reliability_histogram(-torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="gamma"):
        dataset_reliability_histogram(torch.zeros(1, 3, 3), gamma=0)


def test_reliability_diagram_content(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 30, 30, generator=g) * 2
    y = torch.randint(0, 3, (2, 30, 30), generator=g)
    stats = F.binned_stats(x, y, num_bins=10, to_onehot_y=True, softmax=True)
    errs = F.calibration_errors(x, y, num_bins=10, to_onehot_y=True, softmax=True, include_background=True)
    fig = reliability_diagram(stats, image=1, class_index=2, title="case 1, class 2")
    ax = fig.axes[0]
    assert ax.get_title() == "case 1, class 2"
    assert _has_diagonal(ax)
    text = " ".join(t.get_text() for t in ax.texts)
    for name, v in zip(("ECE", "ACE", "MCE"), errs, strict=True):
        assert f"{name} {float(v[1, 2]):.4f}" in text
    n, sp, sy = (s[1, 2].double() for s in stats)
    valid = n > 0
    gaps = sorted(round(p.get_height(), 9) for p in ax.patches)
    expected = sorted(round(float(v), 9) for v in (sp[valid] / n[valid] - sy[valid] / n[valid]).abs())
    assert gaps == pytest.approx(expected, abs=1e-6)  # one gap bar per non-empty bin
    ticks = ax.collections[0].get_offsets()  # observed-frequency ticks at bin centres
    np.testing.assert_allclose(np.asarray(ticks)[:, 1], (sy[valid] / n[valid]).numpy(), atol=1e-6)
    assert len(fig.axes) == 2 and fig.axes[1].get_yscale() == "log"
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    # (M,) tuples work too, and no count panel on request
    fig = reliability_diagram((n, sp, sy), show_counts=False)
    assert len(fig.axes) == 1


def test_reliability_diagram_bad_input():
    with pytest.raises(TypeError, match="stats"):
        reliability_diagram(torch.zeros(5))
    with pytest.raises(ValueError, match="shapes"):
        reliability_diagram((torch.ones(5), torch.ones(4), torch.ones(5)))


def test_plots_take_ax():
    from matplotlib.figure import Figure

    m = _metric()
    H = m.histogram()
    fig = Figure()
    axes = fig.subplots(1, 3)
    out = dataset_reliability_histogram(H, ax=axes[1], class_names=["a", "b", "c"], class_index=2)
    assert out is fig and axes[1].get_title() == "c"
    data = np.ma.getdata(_mesh(axes[1]).get_array()).reshape(10, 10)
    cols = H[2].sum(0).numpy()
    np.testing.assert_allclose(data[:, cols > 0], (H[2] / H[2].sum(0).clamp(min=1)).numpy()[:, cols > 0])
    assert _has_diagonal(axes[1]) and not axes[0].collections  # nothing drawn elsewhere
    dataset_reliability_histogram(H, ax=axes[0])
    assert axes[0].get_title() == "all classes"
    data = np.ma.getdata(_mesh(axes[0]).get_array()).reshape(10, 10)
    tot = H.sum(0)
    cols = tot.sum(0).numpy()
    np.testing.assert_allclose(data[:, cols > 0], (tot / tot.sum(0).clamp(min=1)).numpy()[:, cols > 0])
    with pytest.raises(ValueError, match="class_index"):
        dataset_reliability_histogram(H, ax=axes[2], class_index=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 20, 20, generator=g)
    y = torch.randint(0, 3, (1, 20, 20), generator=g)
    stats = F.binned_stats(x, y, num_bins=10, to_onehot_y=True, softmax=True)
    out = reliability_diagram(stats, class_index=1, ax=axes[2], title="one")
    assert out is fig and axes[2].get_title() == "one" and _has_diagonal(axes[2])
    assert len(fig.axes) == 3 + 2  # the three panels and the two heat maps' colour bars


# ---------------------------------------------------------------------------------------------------------
# The figure style (calibops.plot): print sizes, fonts >= 7 pt, aligned axes, PDF + 300-dpi PNG
# ---------------------------------------------------------------------------------------------------------


def _drawn(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()  # runs the constrained layout and creates the tick labels
    return fig


def _texts(fig):
    from matplotlib.text import Text

    out = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    for ax in fig.axes:
        for t in ax.get_xticklabels(which="both") + ax.get_yticklabels(which="both"):
            if t.get_visible() and t.get_text().strip():
                out.append(t)
    return out


def _style_figures():
    from calibops.metrics.report import reliability_panels
    from calibops.plot import comparison_grid, pooled_reliability

    names = ["background", "liver", "kidney", "spleen"]
    m = _metric()
    top = DatasetCalibration(4, num_bins=10, to_onehot_y=True, softmax=True, mode="top_label")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 4, 12, 10, generator=g) * 2, torch.randint(0, 4, (4, 12, 10), generator=g)
    top.update(x, y)
    grouped = DatasetCalibration(4, num_bins=10, to_onehot_y=True, softmax=True, groups=["a", "b", "c"])
    grouped.update(x, y, groups=["a", "b", "c", "a"])
    stats = F.binned_stats(x, y, num_bins=10, to_onehot_y=True, softmax=True)
    H = m.histogram()
    return {
        "histogram": m.plot(class_names=names),
        "histogram one row of 5": dataset_reliability_histogram(torch.cat([H, H[:2]]), ncols=5),
        "top-label histogram": top.plot(),
        "reliability diagram": reliability_diagram(stats, class_index=1),
        "pooled reliability": pooled_reliability(m.pooled_stats(), H, class_index=1, class_names=names[1:]),
        "pooled top-label": pooled_reliability(top.pooled_stats(), top.histogram()),
        "comparison": comparison_grid([H, H * 2], ["run a", "run b"], class_names=names[1:]),
        "groups": grouped.plot_groups(1, title="kidney"),
        "panels": reliability_panels([BinnedStats(*(t[0, 1] for t in stats))] * 5, list("abcde")),
    }


from calibops.results import BinnedStats  # noqa: E402


def test_figures_are_print_sized_with_fonts_of_at_least_7pt():
    from calibops.plot import DOUBLE_COLUMN, MIN_FONT_PT, SINGLE_COLUMN

    assert MIN_FONT_PT >= 7
    for what, fig in _style_figures().items():
        _drawn(fig)
        w = fig.get_size_inches()[0]
        assert w in (SINGLE_COLUMN, DOUBLE_COLUMN), f"{what}: {w} in wide"
        texts = _texts(fig)
        assert texts, what
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < MIN_FONT_PT]
        assert not small, f"{what}: texts under {MIN_FONT_PT} pt: {small[:5]}"
    # one panel: a single column; several: a double column
    assert _style_figures()["top-label histogram"].get_size_inches()[0] == SINGLE_COLUMN


def _pairs(fig):
    """(heat map or diagram, count bars under it) pairs: axes sharing their x axis."""
    pairs = []
    for ax in fig.axes:
        for other in ax.get_shared_x_axes().get_siblings(ax):
            if other is not ax and other.get_yscale() == "log" and ax.get_yscale() != "log":
                pairs.append((ax, other))
    return pairs


def test_heat_maps_and_count_bars_share_their_x_extent():
    figs = _style_figures()
    for what in ("histogram", "top-label histogram", "pooled reliability", "pooled top-label", "comparison"):
        fig = _drawn(figs[what])
        pairs = _pairs(fig)
        assert pairs, what
        for top, bottom in pairs:
            a, b = top.get_position(), bottom.get_position()
            assert abs(a.x0 - b.x0) < 1e-6 and abs(a.x1 - b.x1) < 1e-6, f"{what}: {a} vs {b}"
            assert a.y0 > b.y1  # the bars sit below
        # the colour bar has its own column: it overlaps no heat map horizontally and leaves their widths equal
        cbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        heat = _heat_axes(fig)
        assert cbars and heat
        for cb in cbars:
            assert all(cb.get_position().x0 >= h.get_position().x1 for h in heat), what
        widths = {round(h.get_position().width, 6) for h in heat}
        assert len(widths) == 1, f"{what}: heat map widths {widths}"
    # the single panel of a top-label histogram specifically (the colour bar took width from the map only)
    fig = _drawn(figs["top-label histogram"])
    ((top, bottom),) = _pairs(fig)
    assert top.get_position().width == pytest.approx(bottom.get_position().width, abs=1e-9)


def test_comparison_grid_rows_and_columns():
    from calibops.plot import comparison_grid

    H = _metric().histogram()
    fig = comparison_grid([H, H, H], ["a", "b", "c"], class_names=["x", "y", "z"])
    heat = _heat_axes(fig)
    assert len(heat) == 3 * 4  # a row per run, a column per class and "all classes"
    assert [ax.get_title() for ax in heat[:4]] == ["x", "y", "z", "all classes"]
    assert [ax.get_ylabel().split("\n")[0] for ax in heat[::4]] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="run_names"):
        comparison_grid([H], ["a", "b"])
    with pytest.raises(ValueError, match="same classes"):
        comparison_grid([H, H[:2]], ["a", "b"])


def test_pooled_reliability_content():
    from calibops.plot import pooled_reliability

    m = _metric()
    s = m.pooled_stats()
    fig = pooled_reliability(s, m.histogram(), class_index=2, class_names=["b", "c", "d"])
    assert fig._suptitle.get_text() == "d"
    left = fig.axes[0]
    n, sp, sy = (t[2].numpy() for t in s)
    valid = n > 0
    heights = [p.get_height() for p in left.patches if p.get_label() != "gap" and p.get_facecolor()[3] > 0]
    np.testing.assert_allclose(sorted(heights[: int(valid.sum())]), sorted(sy[valid] / n[valid]), atol=1e-12)
    errs = F.calibration_errors_from_stats(BinnedStats(*(torch.as_tensor(v).view(1, 1, -1) for v in (n, sp, sy))))
    assert f"ECE {float(errs.ece.reshape(-1)[0]):.4f}" in " ".join(t.get_text() for t in left.texts)
    with pytest.raises(ValueError, match="shape"):
        pooled_reliability(s, m.histogram()[:2])


def test_save_figure_writes_pdf_and_300dpi_png(tmp_path):
    import struct

    from calibops.plot import PNG_DPI, file_stem, save_figure

    fig = _metric().plot()
    paths = save_figure(fig, tmp_path / "h.png")
    assert [p.name for p in paths] == ["h.pdf", "h.png"]
    assert paths[0].read_bytes()[:5] == b"%PDF-"
    png = paths[1].read_bytes()
    w, h = struct.unpack(">II", png[16:24])  # IHDR
    assert w == round(fig.get_size_inches()[0] * PNG_DPI) and h == round(fig.get_size_inches()[1] * PNG_DPI)
    assert b"/FontFile2" in paths[0].read_bytes()  # TrueType fonts embedded (editable text), not Type 3
    assert file_stem("left kidney") == "left_kidney" and file_stem("a/b:c") == "a_b_c" and file_stem("//") == "unnamed"


def test_figure_width_is_checked():
    with pytest.raises(ValueError, match="width"):
        dataset_reliability_histogram(torch.ones(2, 3, 3), width="wide")
