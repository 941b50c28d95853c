"""Text that plots draw from user data (module names, suggestion names, titles passed in) comes out exactly as
given: never read as mathtext, never sent to LaTeX, never dropped from a legend for starting with "_"."""
import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text

from deepscope import plots
from test_plots import make_fake_stats

# "$" pairs are mathtext ("$\foo$" raises when drawn, "x$y$z" is italic "xyz"); a lone "$", "\", "_", "^",
# "%" and braces mean something to mathtext or LaTeX; a leading "_" hides a label from matplotlib's legend.
NAMES = ["a$b", "x$y$z", "enc\\layer", "$\\frac{1}{0}$", "$\\foo$", "_hidden", "50% {x}^2", "a_b"]


@pytest.fixture(autouse=True)
def _no_leaks():
    plt.close("all")
    yield
    plt.close("all")


@pytest.fixture
def stats():
    return make_fake_stats(M=len(NAMES) + 1, names=NAMES + ["last"])  # every name owns parameters and gets a gradient


def user_texts(fig, expected: list[str]) -> list[Text]:
    """The figure's Text objects showing `expected`, checking that each string is shown."""
    texts = [t for t in fig.findobj(Text) if t.get_text() in expected]
    assert sorted({t.get_text() for t in texts}) == sorted(expected)
    return texts


# (plot, the strings from user data it must show)
PLOTS = {
    "mean_std": (lambda s: plots.mean_std_plot(s), NAMES + ["last"]),
    "color_dim": (lambda s: plots.color_dim(s, "$\\foo$"), ["$\\foo$"]),
    "color_dim_grid": (lambda s: plots.color_dim_grid(s), NAMES + ["last"]),
    "dead": (lambda s: plots.dead_chart(s), NAMES + ["last"]),
    "grad_norm": (lambda s: plots.grad_norm_plot(s), NAMES),  # "last" has no gradient
    "param_grad_norm": (lambda s: plots.grad_norm_plot(s, params=True), NAMES),
    "update_ratio": (lambda s: plots.update_ratio_plot(s), NAMES + ["1e-3 reference"]),
    "status_x": (lambda s: plots.status_screen(s, "x$y$z"), ["x$y$z"]),
    "status_frac": (lambda s: plots.status_screen(s, "$\\frac{1}{0}$"), ["$\\frac{1}{0}$"]),
    "lr_find": (lambda s: plots.lr_find_plot([1e-4, 1e-3, 1e-2, 1e-1], [2, 1.5, 1, 3],
                                             {name: 1e-3 for name in NAMES[:4]}),
                [f"{name}: 1.00e-03" for name in NAMES[:4]]),
    "curve": (lambda s: plots.plot_curve([3, 2, 1], title="$\\foo$", xlabel="a_b", ylabel="x$y$z"),
              ["$\\foo$", "a_b", "x$y$z"]),
}


@pytest.mark.parametrize("kind", list(PLOTS))
def test_names_are_drawn_literally(stats, kind):
    make, expected = PLOTS[kind]
    fig = make(stats)
    fig.canvas.draw()  # lays the text out: mathtext would be parsed (and "$\foo$" raise) here
    for text in user_texts(fig, expected):
        assert not text.get_parse_math() and not text.get_usetex(), text.get_text()
    assert plots.figure_to_png(fig, dpi=30).startswith(b"\x89PNG")


@pytest.mark.parametrize("kind", ["mean_std", "dead", "lr_find", "curve"])  # no tight_layout: it would run LaTeX
def test_names_stay_out_of_latex_when_usetex_is_on(stats, kind):
    make, expected = PLOTS[kind]
    with matplotlib.rc_context({"text.usetex": True}):  # "_" and "%" would break LaTeX; nothing is drawn here
        fig = make(stats)
    assert all(not t.get_usetex() for t in user_texts(fig, expected))


def test_a_label_starting_with_underscore_stays_in_the_legend(stats):
    fig = plots.dead_chart(stats, ["_hidden", "a_b"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["_hidden", "a_b"]
