"""Plots: each returns a figure holding exactly the statistics it was given, with or without `ax`."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest

from deepscope import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_fake_stats(T: int = 6, M: int = 3, B: int = 40, names: list[str] | None = None):
    """Statistics shaped like deepscope.stats.Stats (the real class when it is importable)."""
    rng = np.random.default_rng(0)
    names = names or [f"layers.{i}" for i in range(M)]
    params = names[:-1]  # modules owning parameters; the last one (an activation, say) owns none
    P = len(params)
    grad_norm = rng.uniform(0.1, 2, (T, M)).astype(np.float32)
    grad_norm[:, -1] = np.nan  # a module that never gets a gradient
    fields = dict(
        modules=names, steps=np.arange(0, 10 * T, 10, dtype=np.int64), weights=np.ones(T, dtype=np.int64),
        act_mean=rng.normal(size=(T, M)).astype(np.float32), act_std=rng.uniform(0.5, 2, (T, M)).astype(np.float32),
        act_min=-np.ones((T, M), np.float32), act_max=np.ones((T, M), np.float32),
        act_dead=rng.uniform(0, 1, (T, M)).astype(np.float32), act_nonfinite=np.zeros((T, M), np.float32),
        act_hist=rng.integers(0, 1000, (T, M, B)).astype(np.float32), hist_edges=np.linspace(0, 10, B + 1),
        grad_mean=np.zeros((T, M), np.float32), grad_std=np.ones((T, M), np.float32), grad_norm=grad_norm,
        grad_nonfinite=np.zeros((T, M), np.float32), param_modules=params,
        weight_norm=rng.uniform(1, 3, (T, P)).astype(np.float32),
        param_grad_norm=rng.uniform(0.01, 1, (T, P)).astype(np.float32),
        update_ratio=rng.uniform(1e-4, 1e-2, (T, P)).astype(np.float32), dead_threshold=0.01,
    )
    try:
        from deepscope.stats import Stats
    except ImportError:
        return SimpleNamespace(**fields)
    return Stats(**fields)


@pytest.fixture(autouse=True)
def _no_leaks():
    plt.close("all")
    yield
    plt.close("all")


@pytest.fixture
def stats():
    return make_fake_stats()


def ydata(ax):
    return [line.get_ydata() for line in ax.get_lines()]


def test_mean_std_plot_draws_one_line_per_layer_per_panel(stats):
    fig = plots.mean_std_plot(stats)
    assert len(fig.axes) == 2
    for ax, values in zip(fig.axes, (stats.act_mean, stats.act_std)):
        assert len(ax.get_lines()) == 3
        for i, line in enumerate(ax.get_lines()):
            np.testing.assert_array_equal(line.get_xdata(), stats.steps)
            np.testing.assert_array_equal(line.get_ydata(), values[:, i])


def test_mean_std_plot_on_given_axes_and_subset(stats):
    fig, axs = plt.subplots(1, 2)
    assert plots.mean_std_plot(stats, ["layers.1"], axs=axs) is fig
    np.testing.assert_array_equal(ydata(axs[1])[0], stats.act_std[:, 1])
    assert len(axs[0].get_lines()) == 1


def test_unknown_module_names_the_recorded_ones(stats):
    with pytest.raises(KeyError, match="layers.0"):
        plots.dead_chart(stats, ["nope"])


def test_color_dim_image_is_log_counts_with_bins_upwards(stats):
    fig = plots.color_dim(stats, "layers.2")
    (image,) = fig.axes[0].get_images()
    np.testing.assert_allclose(image.get_array(), np.log1p(stats.act_hist[:, 2, :].T))
    assert image.origin == "lower"  # small |activation| at the bottom
    assert image.get_array().shape == (40, 6)  # bins x steps
    ax = fig.axes[0]
    yticks = {t.get_text(): pos for t, pos in zip(ax.get_yticklabels(), ax.get_yticks())}
    assert yticks["5"] == 19.5  # |a| = 5 is the edge between bins 19 and 20 (edges 0, 0.25, ..., 10)
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(stats.steps[int(i)]) for i in ax.get_xticks()]


def test_color_dim_grid_has_one_panel_per_layer():
    stats = make_fake_stats(M=5)
    fig = plots.color_dim_grid(stats, ncols=2)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 5 and len(fig.axes) == 6  # and one colour bar, shared by all
    assert [ax.get_title() for ax in panels] == stats.modules
    assert fig.axes[-1].get_ylabel() == "log(1 + count)"
    assert len({im.get_clim() for ax in panels for im in ax.get_images()}) == 1  # one colour scale
    assert panels[0].get_ylabel() == "|activation|" and panels[-1].get_xlabel() == "step"


def test_dead_chart_is_fraction_on_unit_axis(stats):
    fig, ax = plt.subplots()
    assert plots.dead_chart(stats, ax=ax) is fig
    assert ax.get_ylim() == (0, 1)
    for i, y in enumerate(ydata(ax)):
        np.testing.assert_array_equal(y, stats.act_dead[:, i])


def test_grad_norm_plot_log_scale_skips_layers_without_gradient(stats):
    ax = plots.grad_norm_plot(stats).axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == ["layers.0", "layers.1"]  # layers.2 is all NaN
    np.testing.assert_array_equal(ydata(ax)[1], stats.grad_norm[:, 1])
    ax = plots.grad_norm_plot(stats, params=True).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == stats.param_modules
    np.testing.assert_array_equal(ydata(ax)[1], stats.param_grad_norm[:, 1])


def test_update_ratio_plot_marks_reference(stats):
    ax = plots.update_ratio_plot(stats).axes[0]
    assert ax.get_yscale() == "log"
    *ratios, ref = ax.get_lines()
    np.testing.assert_array_equal(ratios[0].get_ydata(), stats.update_ratio[:, 0])
    assert list(ref.get_ydata()) == [1e-3, 1e-3] and "1e-3" in ref.get_label()
    assert "1e-3 reference" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_status_screen_shows_one_layer_in_four_panels(stats):
    fig = plots.status_screen(stats, "layers.1")
    assert len(fig.axes) == 4
    hist_ax, ms_ax, grad_ax, ur_ax = fig.axes
    np.testing.assert_allclose(hist_ax.get_images()[0].get_array(), np.log1p(stats.act_hist[:, 1].T))
    np.testing.assert_array_equal(ydata(ms_ax)[1], stats.act_std[:, 1])
    np.testing.assert_array_equal(ydata(grad_ax)[0], stats.grad_norm[:, 1])
    np.testing.assert_array_equal(ydata(grad_ax)[1], stats.param_grad_norm[:, 1])
    np.testing.assert_array_equal(ydata(ur_ax)[0], stats.update_ratio[:, 1])


def test_status_screen_of_layer_without_parameters_or_gradient(stats):
    fig = plots.status_screen(stats, "layers.2")
    assert fig.axes[2].get_lines() == []  # its gradient is all NaN
    assert [t.get_text() for t in fig.axes[3].texts] == ["no parameters"]


def test_lr_find_plot_marks_suggestions():
    lrs = np.logspace(-5, 0, 20)
    ax = plots.lr_find_plot(lrs, np.linspace(2, 1, 20), {"valley": 1e-3, "none found": None}).axes[0]
    curve, marker = ax.get_lines()
    assert ax.get_xscale() == "log" and marker.get_xdata()[0] == 1e-3
    assert "valley" in marker.get_label()


@pytest.mark.parametrize("make", [
    lambda s: plots.mean_std_plot(s), lambda s: plots.color_dim(s, "layers.0"), lambda s: plots.color_dim_grid(s),
    lambda s: plots.dead_chart(s), lambda s: plots.grad_norm_plot(s), lambda s: plots.update_ratio_plot(s),
    lambda s: plots.status_screen(s, "layers.0"),
])
def test_every_plot_renders_png_and_closes(stats, make):
    png = plots.figure_to_png(make(stats), dpi=40)
    assert png.startswith(PNG_SIGNATURE)
    assert plt.get_fignums() == []


def test_save_png_writes_file(stats, tmp_path):
    path = plots.save_png(plots.dead_chart(stats), tmp_path / "dead.png", dpi=40)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert plt.get_fignums() == []


def test_data_uri_and_existing_curves():
    fig = plots.plot_curve([3, 2, 1, 0.5], smooth=2)
    assert len(fig.axes[0].get_lines()) == 2
    uri = plots.figure_to_data_uri(fig, dpi=40)
    assert uri.startswith("data:image/png;base64,iVBORw0KGgo")
    fig = plots.plot_metrics([{"epoch": 1, "train_loss": 1.0, "valid_loss": 1.2, "valid_accuracy": 0.5},
                              {"epoch": 2, "train_loss": 0.8, "valid_loss": 1.0, "valid_accuracy": 0.6}])
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [1.2, 1.0]


def test_epoch_plot_has_whole_epoch_ticks_and_one_legend():
    history = [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": 1.2 / e, "valid_accuracy": 0.5 + 0.1 * e}
               for e in (1, 2)]
    fig = plots.plot_metrics(history)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train loss", "valid loss", "valid accuracy"]
    assert fig.axes[1].get_legend() is None
