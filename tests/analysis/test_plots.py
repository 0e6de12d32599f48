"""Figures: PNG + SVG written and returned, fraction scales fixed to [0, 1], one symmetric colour
scale per channel in the decomposition panel, missing values marked n/a."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import plots
from analysis.plot_layout import accuracy_limits, fitted_limits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def captured(monkeypatch):
    """Keep every figure that is saved, so tests can look at its artists."""
    figs = []
    original = plots.save_figure

    def keep(fig, out_base, formats=plots.FORMATS):
        figs.append(fig)
        return original(fig, out_base, formats)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figs


def _check_written(paths, out_base):
    assert [p.name for p in paths] == [out_base.name + ".png", out_base.name + ".svg"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert paths[1].read_text().lstrip().startswith(("<?xml", "<svg"))
    assert not list(out_base.parent.glob("*.tmp"))


def test_fraction_heatmap_fits_its_scale_with_a_colour_bar_and_marks_missing_cells(tmp_path, captured):
    m = [[None, 0.31, 0.12], [0.4, None, 0.2], [0.05, 0.07, None]]
    paths = plots.matrix_heatmap(m, ["a", "b", "c"], tmp_path / "heat", "residual", "fraction",
                                 marks=[[False, True, False], [False] * 3, [False] * 3])
    _check_written(paths, tmp_path / "heat")
    ax = captured[0].axes[0]
    assert ax.collections[0].get_clim() == (0.05, 0.4)          # fitted to the values shown
    assert len(captured[0].axes) == 2                            # the heatmap and its colour bar
    assert "0.31†" in [t.get_text() for t in ax.texts]          # a fit not converged
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("n/a") == 3 and "0.12" in texts
    assert "n/a" in paths[1].read_text()                        # SVG keeps text as text


def test_distance_heatmap_scales_from_zero_to_its_maximum(tmp_path, captured):
    plots.matrix_heatmap([[0.0, 0.8], [0.8, 0.0]], ["a", "b"], tmp_path / "d", "procrustes", "distance",
                         kind="distance")
    assert captured[0].axes[0].collections[0].get_clim() == (0.0, 0.8)


def test_heatmap_rejects_a_matrix_that_does_not_match_its_labels(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        plots.matrix_heatmap([[0.1, 0.2]], ["a", "b"], tmp_path / "x", "t", "v")
    with pytest.raises(ValueError, match="valid: fraction, distance, signed"):
        plots.matrix_heatmap([[0.1]], ["a"], tmp_path / "x", "t", "v", kind="log")


def test_per_order_bars_are_grouped_not_stacked(tmp_path, captured):
    rows = [{"source": "a", "target": "b", "fraction_order0": 1.6, "fraction_order1": 0.9, "fraction_residual": 0.3},
            {"source": "b", "target": "a", "fraction_order0": 0.5, "fraction_order1": None, "fraction_residual": 0.45,
             "convergence": "not converged"}]
    paths = plots.order_fraction_bars(rows, tmp_path / "bars")
    _check_written(paths, tmp_path / "bars")
    ax = captured[0].axes[0]
    bars = ax.patches
    assert [round(b.get_height(), 6) for b in bars] == [1.6, 0.5, 0.9, 0.0, 0.3, 0.45]
    assert all(b.get_y() == 0 for b in bars)                    # side by side: every bar starts at 0
    assert len({round(b.get_x(), 6) for b in bars}) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a→b", "b→a †"]


def test_additive_share_bars_stack_to_one(tmp_path, captured):
    rows = [{"source": "a", "target": "b", "additive_shares": [0.6, 0.15, -0.05]},
            {"source": "b", "target": "a", "additive_shares": [0.3, 0.1, 0.0]}]
    plots.additive_share_bars(rows, tmp_path / "add")
    bars = captured[0].axes[0].patches
    net: dict[float, float] = {}
    for b in bars:                       # the signed heights of one pair's bars add up to 1
        net[round(b.get_x(), 6)] = net.get(round(b.get_x(), 6), 0.0) + b.get_height()
    assert sorted(round(v, 6) for v in net.values()) == [1.0, 1.0]   # shares + unexplained (1 − R²) = 1
    assert min(round(b.get_y(), 6) for b in bars if b.get_height() < 0) == 0.0  # a negative gain hangs below 0


@pytest.mark.slow
def test_decomposition_panel_uses_one_symmetric_scale_per_channel(tmp_path, captured):
    rng = np.random.default_rng(0)
    n, c, k = 2, 3, 2
    panel = {"x_a": rng.normal(size=(n, 5, 4, 4)), "x_b": rng.normal(size=(n, c, 4, 4)),
             "yhat": rng.normal(size=(n, c, 4, 4)), "components": rng.normal(size=(k + 1, n, c, 4, 4)),
             "residual": rng.normal(size=(n, c, 4, 4)) * 3, "gates": [0.7, 0.2], "rows": [3, 8], "channels": [0, 2],
             "images": rng.random(size=(n, 12, 12)), "source": "a", "target": "b"}
    paths = plots.decomposition_panel(panel, tmp_path / "panel", "title")
    _check_written(paths, tmp_path / "panel")
    fig = captured[0]
    map_axes = [ax for ax in fig.axes if ax.images and ax.images[0].get_cmap().name == plots.SIGNED_CMAP]
    assert len(map_axes) == n * 2 * (2 + (k + 1) + 1)           # x_B, ŷ, Y0..Y2, residual per (image, channel)
    per_row = 2 + (k + 1) + 1
    for r in range(n * 2):
        i, ch = divmod(r, 2)
        c_idx = panel["channels"][ch]
        lim = max(np.abs(m).max() for m in [panel["x_b"][i, c_idx], panel["yhat"][i, c_idx], panel["residual"][i, c_idx]]
                  + [panel["components"][j, i, c_idx] for j in range(k + 1)])
        clims = {ax.images[0].get_clim() for ax in map_axes[r * per_row:(r + 1) * per_row]}
        assert clims == {(-lim, lim)}
    gate_ax = [ax for ax in fig.axes if ax.patches and not ax.images][0]
    assert [round(p.get_width(), 6) for p in gate_ax.patches] == [0.7, 0.2]
    assert gate_ax.get_xlim() == (0.0, 1.0)


def test_curves_and_scatter_write_png_and_svg(tmp_path, captured):
    gens = [{"generation": 0, "test_top1": 60.0, "slim_test_top1": 10.0},
            {"generation": 1, "test_top1": 65.0, "slim_test_top1": 55.0, "residual_to_previous": 0.3,
             "residual_to_first": 0.3},
            {"generation": 2, "test_top1": 66.0, "residual_to_previous": 0.2, "residual_to_first": 0.35}]
    _check_written(plots.generation_curves(gens, tmp_path / "gen"), tmp_path / "gen")
    lo, hi = captured[-1].axes[1].get_ylim()
    assert 0.0 <= lo < 0.2 and 0.35 < hi < 0.5                   # residual fractions: fitted to the data
    assert len(captured[-1].axes[0].lines) == 2                  # dense and slim accuracy
    hist = {"a": [{"epoch": 1, "train_loss": 2.0, "test_top1": 30.0}, {"epoch": 2, "train_loss": 1.0, "test_top1": 50.0}]}
    _check_written(plots.training_curves(hist, tmp_path / "train"), tmp_path / "train")
    pts = [{"label": "a–b", "x": 0.9, "y": 0.8}, {"label": "a–c", "x": 0.4, "y": -0.02}]
    _check_written(plots.agreement_scatter(pts, tmp_path / "sc", "CKA", "R²", "t"), tmp_path / "sc")
    assert captured[-1].axes[0].get_ylim()[0] < -0.02            # a slightly negative R² stays visible


def test_scatter_axes_fit_clustered_points_and_labels_do_not_collide(tmp_path, captured):
    pts = [{"label": f"net{i}–net{i + 1}", "x": 0.966 + 0.001 * i, "y": 0.80 + 0.002 * i,
            "x_ci": [0.96 + 0.001 * i, 0.972 + 0.001 * i], "usable": i != 2} for i in range(5)]
    plots.agreement_scatter(pts, tmp_path / "sc", "CKA", "R²", "t")
    ax = captured[-1].axes[0]
    assert ax.get_xlim()[1] - ax.get_xlim()[0] < 0.1 and ax.get_ylim()[1] - ax.get_ylim()[0] < 0.1
    fig = captured[-1]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()]
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_accuracy_axes_span_at_least_five_points():
    assert accuracy_limits([95.05, 95.55])[1] - accuracy_limits([95.05, 95.55])[0] >= 5.0
    lo, hi = accuracy_limits([10.0, 90.0])
    assert lo < 10 and hi > 90 and hi - lo < 100
    assert accuracy_limits([99.9])[1] == 100.0 and accuracy_limits([None]) is None
    assert fitted_limits([0.13, 0.28]) == pytest.approx((0.118, 0.292))


def test_mostly_empty_matrices_become_bars_grouped_by_family(tmp_path, captured):
    rows = [{"source": "a", "target": "b", "fraction_residual": 0.2, "fraction_residual_ci": [0.1, 0.3]},
            {"source": "c", "target": "d", "fraction_residual": 0.4}]
    plots.pair_value_bars(rows, "fraction_residual", {"a→b": "seeds", "c→d": "kd"}, tmp_path / "pb", "t", "v")
    ax = captured[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c→d", "a→b"]      # grouped: kd before seeds
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kd", "seeds"]


def test_residual_energy_figure_shows_the_largest_channels_first(tmp_path, captured):
    rel = np.array([0.1, 0.9, 0.3, 0.05])
    diag = {"a": "a", "b": "b",
            "blind_spots": {"channel_relative": rel, "position_relative": np.ones((3, 3))},
            "unreliable": {"channel_relative": rel[::-1], "position_relative": np.zeros((3, 3))}}
    _check_written(plots.residual_energy_figure(diag, tmp_path / "res", top=3), tmp_path / "res")
    ax = captured[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "0"]
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.9, 0.3, 0.1]
