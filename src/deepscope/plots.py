"""Plots with matplotlib. Every function takes `ax=None`, returns the figure and never calls `plt.show()`.

Importing this module changes nothing in matplotlib: the backend is whatever the user (or matplotlib's own
choice: Agg when there is no display) made it, so `plt.show()` and Jupyter's inline display work as usual.
Figures are made through pyplot when no `ax` is given, and `save_png` / `figure_to_png` write a PNG with
any backend (matplotlib prints PNG through Agg whatever the screen backend is), so the CLI and the report
save plots headless without choosing a backend.

Text that comes from the user's data (module names, metric and suggestion names, titles and labels passed
in) is drawn literally, see `LITERAL`.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Text properties that draw a string exactly as given. By default matplotlib reads the text between two
# "$" as mathtext ("x$y$z" comes out as an italic "xyz", "$\foo$" raises when the figure is drawn) and,
# when rcParams["text.usetex"] is on, hands every string to LaTeX, where "_", "%", "^" and "\" mean
# something else. Module names such as "enc$1" or "block_0" must neither crash a report nor be rewritten.
LITERAL = {"parse_math": False, "usetex": False}


def literal(*texts) -> None:
    """Draw these matplotlib Text objects literally (see `LITERAL`)."""
    for text in texts:
        text.set(**LITERAL)


class ReprFigure(Figure):
    """A Figure that shows itself as an image in a notebook, whether or not `%matplotlib inline` has
    registered matplotlib's own formatter (without it, a fresh kernel shows "<Figure size ...>")."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def subplots(*args, **kwargs):
    """`plt.subplots` making a `ReprFigure`, except that in a Jupyter kernel the figure is handed back to the
    caller only: pyplot's inline backend would also show every figure it holds at the end of the cell, so
    a figure a plot function returns would appear twice."""
    fig, axs = plt.subplots(*args, FigureClass=ReprFigure, **kwargs)
    from .callbacks.progress import in_notebook

    if in_notebook():
        plt.close(fig)  # the Figure stays drawable; Jupyter shows it once, as the cell's value
    return fig, axs


def _axes(ax=None, figsize=(6, 3.5)):
    if ax is None:
        fig, ax = subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_curve(values: Sequence[float], ax=None, *, title: str = "", xlabel: str = "", ylabel: str = "",
               smooth: int = 0, logy: bool = False):
    """One curve; `smooth > 1` overlays a moving average of that many points."""
    fig, ax = _axes(ax)
    ax.plot(range(len(values)), values, lw=0.8, alpha=0.6 if smooth > 1 else 1.0)
    if smooth > 1 and len(values) >= smooth:
        kernel = [1.0 / smooth] * smooth
        ax.plot(range(smooth - 1, len(values)), np.convolve(values, kernel, mode="valid"), lw=1.5)
    ax.set_title(title, **LITERAL)
    ax.set_xlabel(xlabel, **LITERAL)
    ax.set_ylabel(ylabel, **LITERAL)
    if logy:
        ax.set_yscale("log")
    return fig


def plot_metrics(history: list[dict], ax=None):
    """Train and valid loss per epoch, with accuracy on a second axis when present."""
    fig, ax = _axes(ax)
    epochs = [r["epoch"] for r in history]
    for key, style in (("train_loss", "o-"), ("valid_loss", "s-")):
        values = [r.get(key) for r in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, style, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="loss", title="loss and accuracy per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    acc = [r.get("valid_accuracy") for r in history]
    handles, labels = ax.get_legend_handles_labels()
    if any(v is not None for v in acc):
        ax2 = ax.twinx()
        ax2.plot(epochs, acc, "^--", color="tab:green", label="valid accuracy")
        ax2.set_ylabel("accuracy")
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:  # one legend, placed where it covers the fewest points
        ax.legend(handles, labels, loc="best", fontsize="small")
    return fig


def figure_to_png(fig, dpi: int = 100, tight: bool = True) -> bytes:
    """The figure as PNG bytes (and closed). `tight` crops it to what is drawn, which draws it twice: pass
    False for a figure whose margins are already set (layer_panels), at half the time."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return buf.getvalue()


def figure_to_data_uri(fig, dpi: int = 100, tight: bool = True) -> str:
    """A PNG as a data: URI, so a report can inline it and open with no network and no side files."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi, tight)).decode("ascii")


# --- per-layer statistics ------------------------------------------------------------------------------
# `stats` is a deepscope.stats.Stats (or anything with the same array attributes): rows are training
# steps (`stats.steps`), columns are modules (`stats.modules`) or the modules owning parameters
# (`stats.param_modules`).

def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as a PNG file and close it (so a loop of plots does not accumulate figures)."""
    path = Path(path)
    path.write_bytes(figure_to_png(fig, dpi))
    return path


def _names(available: Sequence[str], wanted: Sequence[str] | str | None) -> list[tuple[int, str]]:
    """(column, name) pairs for `wanted` (all when None); an unknown name is an error that lists the options."""
    available = list(available)
    if wanted is None:
        return list(enumerate(available))
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    missing = [w for w in wanted if w not in available]
    if missing:
        raise KeyError(f"no statistics for {missing}; recorded modules are {available}")
    return [(available.index(w), w) for w in wanted]


def _recorded(stats) -> list[str]:
    """Modules with at least one recorded activation: the default of the per-layer plots, so a module
    never called (MultiheadAttention.out_proj) or with no float output draws no empty line or panel."""
    if len(stats.steps) == 0:
        return list(stats.modules)
    return [name for i, name in enumerate(stats.modules) if np.isfinite(stats.act_mean[:, i]).any()]


def _lines(ax, x, columns, labels, *, title: str, ylabel: str, logy: bool = False, legend: bool = True) -> list:
    """One line per column; returns the lines. Past ten lines the default colours repeat, so colour follows
    depth (early layers dark, late layers light) instead."""
    many = len(columns) > 10
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(columns))) if many else [None] * len(columns)
    lines = [ax.plot(x, y, lw=1.0, label=label, color=color, ls=("-", "--", ":")[k % 3] if many else "-")[0]
             for k, (y, label, color) in enumerate(zip(columns, labels, colors))]
    ax.set_title(title, **LITERAL)
    ax.set(xlabel="step", ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if legend and lines:
        _legend(ax, lines)
    return lines


def _legend(ax, handles: list) -> None:
    """A legend of `handles` under their labels, drawn literally. The handles are passed explicitly because
    matplotlib's automatic legend skips every label that starts with "_" (a module named "_orig_mod.conv"
    would vanish). More than four entries go outside, right of the axes."""
    where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if len(handles) > 4 else {"loc": "best"}
    legend = ax.legend(handles, [h.get_label() for h in handles], fontsize="x-small", **where)
    literal(*legend.get_texts())


def mean_std_plot(stats, modules: Sequence[str] | None = None, axs=None):
    """Activation mean (left) and std (right) per layer over training: one line per layer."""
    if axs is None:
        fig, axs = subplots(1, 2, figsize=(11, 3.5))
    fig = axs[0].figure
    cols = _names(stats.modules, _recorded(stats) if modules is None else modules)
    labels = [name for _, name in cols]
    _lines(axs[0], stats.steps, [stats.act_mean[:, i] for i, _ in cols], labels, title="activation mean", ylabel="mean",
           legend=False)
    _lines(axs[1], stats.steps, [stats.act_std[:, i] for i, _ in cols], labels, title="activation std", ylabel="std")
    return fig


def _step_ticks(ax, steps, n: int = 5) -> None:
    """Label an image's column axis (row index of the stats) with training steps, which may be uneven."""
    idx = np.unique(np.linspace(0, len(steps) - 1, min(n, len(steps))).round().astype(int))
    ax.set_xticks(idx, [str(int(steps[i])) for i in idx])


def color_dim(stats, module: str, ax=None, *, title: str | None = None):
    """The "colorful dimension" plot (fastai course part 2, lesson 16): one column per recorded step, one row
    per histogram bin of |activation| (small values at the bottom), colour = log1p(count)."""
    fig, ax = _axes(ax, figsize=(5, 3.5))
    ((i, name),) = _names(stats.modules, [module])
    image = np.log1p(np.asarray(stats.act_hist[:, i, :], dtype=np.float64).T)  # (B, T)
    ax.imshow(image, origin="lower", aspect="auto", interpolation="nearest", cmap="viridis")
    _step_ticks(ax, stats.steps)
    # Round |activation| values as y ticks, placed where they fall among the bin edges (edge k is the
    # bottom of image row k, at y = k - 0.5), so the labels are right for any spacing of the bins.
    edges = np.asarray(stats.hist_edges, dtype=float)
    values = [v for v in MaxNLocator(4).tick_values(edges[0], edges[-1]) if edges[0] <= v <= edges[-1]]
    ax.set_yticks(np.interp(values, edges, np.arange(len(edges))) - 0.5, [f"{v:g}" for v in values])
    ax.set_title(name if title is None else title, **LITERAL)
    ax.set(xlabel="step", ylabel="|activation|")
    return fig


def color_dim_grid(stats, modules: Sequence[str] | None = None, ncols: int = 4):
    """`color_dim` for every layer, one panel each (unused grid cells are removed)."""
    cols = _names(stats.modules, _recorded(stats) if modules is None else modules)
    ncols = max(1, min(ncols, len(cols)))
    nrows = max(1, -(-len(cols) // ncols))
    fig, axs = subplots(nrows, ncols, figsize=(3.2 * ncols + 0.8, 2.6 * nrows), squeeze=False)
    images = []
    for k, (ax, (_, name)) in enumerate(zip(axs.flat, cols)):
        color_dim(stats, name, ax=ax)
        images += ax.get_images()
        ax.set_xlabel("step" if k >= len(cols) - ncols else "")       # the bottom panel of each column
        ax.set_ylabel("|activation|" if k % ncols == 0 else "")       # the first panel of each row
        ax.title.set_fontsize("small")
    for ax in list(axs.flat)[len(cols):]:
        fig.delaxes(ax)
    # one colour scale for every panel, so colours compare across layers, and its bar
    top = max((float(np.nanmax(im.get_array())) for im in images if np.size(im.get_array())), default=1.0)
    for im in images:
        im.set_clim(0.0, top if np.isfinite(top) and top > 0 else 1.0)
    fig.suptitle("activation histograms over training")
    fig.tight_layout()
    if images:
        fig.colorbar(images[0], ax=[ax for ax in axs.flat if ax.figure is fig and ax in fig.axes],
                     label="log(1 + count)", fraction=0.03, pad=0.02)
    return fig


def dead_chart(stats, modules: Sequence[str] | None = None, ax=None):
    """Fraction of "off" activation values per layer over training, on a 0..1 axis: at the floor of a
    ReLU-like activation, saturated for sigmoid/tanh, near zero elsewhere (deepscope.dead, the one
    definition; `stats.dead_rules` says which rule each layer had)."""
    fig, ax = _axes(ax)
    cols = _names(stats.modules, _recorded(stats) if modules is None else modules)
    rules = stats.dead_rules or []
    label = lambda i, n: f"{n} ({rules[i].split(':', 1)[0]})" if i < len(rules) else n  # noqa: E731
    title = ("off activations (at the activation's floor; saturated; |a| ≤ "
             f"{float(stats.dead_threshold):.2g} elsewhere)" if rules else
             f"dead activations (|a| ≤ {float(stats.dead_threshold):.2g})")
    _lines(ax, stats.steps, [stats.act_dead[:, i] for i, _ in cols], [label(i, n) for i, n in cols],
           title=title, ylabel="fraction of values")
    ax.set_ylim(0, 1)
    return fig


def grad_norm_plot(stats, modules: Sequence[str] | None = None, ax=None, *, params: bool = False):
    """Gradient norm per layer over training (log y). `params=True`: the parameters' gradient norms instead
    of the gradients flowing out of each module. Layers without any gradient (all NaN) are left out."""
    fig, ax = _axes(ax)
    names, values = (stats.param_modules, stats.param_grad_norm) if params else (stats.modules, stats.grad_norm)
    cols = [(i, n) for i, n in _names(names, modules) if np.isfinite(values[:, i]).any()]
    _lines(ax, stats.steps, [values[:, i] for i, _ in cols], [n for _, n in cols], logy=True,
           title="parameter gradient norm" if params else "gradient norm (module outputs)", ylabel="norm")
    return fig


# Karpathy (makemore part 3, "Building makemore Part 3"): an update / data ratio near 1e-3 is healthy;
# much lower learns slowly, much higher is unstable.
UPDATE_RATIO_REFERENCE = 1e-3


def update_ratio_plot(stats, params: Sequence[str] | None = None, ax=None):
    """||w_after - w_before|| / ||w_before|| per module owning parameters (log y), with the ~1e-3 reference."""
    fig, ax = _axes(ax)
    cols = _names(stats.param_modules, params)
    lines = _lines(ax, stats.steps, [stats.update_ratio[:, j] for j, _ in cols], [n for _, n in cols], logy=True,
                   title="update / weight ratio", ylabel="ratio", legend=False)
    reference = ax.axhline(UPDATE_RATIO_REFERENCE, color="k", ls="--", lw=2, alpha=0.6, label="1e-3 reference")
    _legend(ax, lines + [reference])
    return fig


def status_screen(stats, module: str):
    """One layer at a glance (2x2): activation histogram image, activation mean/std, gradient norm, update ratio."""
    fig, axs = subplots(2, 2, figsize=(10, 6.5))
    ((i, _),) = _names(stats.modules, [module])
    color_dim(stats, module, ax=axs[0, 0], title="activation histogram")
    _lines(axs[0, 1], stats.steps, [stats.act_mean[:, i], stats.act_std[:, i]], ["mean", "std"],
           title="activation mean and std", ylabel="value")
    j = list(stats.param_modules).index(module) if module in stats.param_modules else None
    grads = [stats.grad_norm[:, i]] + ([] if j is None else [stats.param_grad_norm[:, j]])
    labels = ["output gradient", "parameter gradient"]
    keep = [k for k, g in enumerate(grads) if np.isfinite(g).any()]
    _lines(axs[1, 0], stats.steps, [grads[k] for k in keep], [labels[k] for k in keep], title="gradient norm",
           ylabel="norm", logy=bool(keep))
    if j is not None:
        update_ratio_plot(stats, [module], ax=axs[1, 1])
    else:
        axs[1, 1].text(0.5, 0.5, "no parameters", ha="center", va="center", transform=axs[1, 1].transAxes)
        axs[1, 1].set(title="update / weight ratio", xticks=[], yticks=[])
    fig.suptitle(module, **LITERAL)
    fig.tight_layout()
    return fig


def lr_find_plot(lrs: Sequence[float], losses: Sequence[float], suggestions: dict[str, float] | None = None, ax=None):
    """Loss against learning rate (log x), each suggested learning rate marked on the curve (a suggestion
    of None, where a rule found none, is skipped)."""
    fig, ax = _axes(ax)
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    ax.plot(lrs, losses, lw=1.2)
    marked = {name: lr for name, lr in (suggestions or {}).items() if lr is not None and np.isfinite(lr)}
    markers = []
    for k, (name, lr) in enumerate(marked.items()):
        loss = np.interp(np.log(lr), np.log(lrs), losses) if len(lrs) else np.nan
        markers += ax.plot([lr], [loss], "o", color=f"C{k + 1}", label=f"{name}: {lr:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="learning-rate finder")
    if markers:
        _legend(ax, markers)
    return fig


# --- the report's scannable plots: labelled axes, units and colour bars ---------------------------------
# Added for the run report (report.py); the functions above keep their own layout.

REPORT_FONT = {"title": 10, "label": 9, "tick": 8}  # points; at the report's dpi every text is ~9 px or more


def _small_text(ax) -> None:
    ax.title.set_fontsize(REPORT_FONT["title"])
    ax.xaxis.label.set_fontsize(REPORT_FONT["label"])
    ax.yaxis.label.set_fontsize(REPORT_FONT["label"])
    ax.tick_params(labelsize=REPORT_FONT["tick"])


def _report_legend(ax, handles: list) -> None:
    """A legend inside the axes in the report's type size, labels drawn literally."""
    legend = ax.legend(handles, [h.get_label() for h in handles], fontsize=REPORT_FONT["tick"], loc="best",
                       framealpha=0.7, handlelength=1.5)
    literal(*legend.get_texts())


def color_dim_panel(stats, module: str, ax=None, *, title: str | None = None):
    """`color_dim` with its axes labelled (training step; |activation| bin) and a colour bar saying what
    the colour means (log(1 + count) of the values in a bin at that step)."""
    fig, ax = _axes(ax, figsize=(5, 3.5))
    color_dim(stats, module, ax=ax, title=f"{module}: |activation| histogram" if title is None else title)
    ax.set_xlabel("training step")
    ax.set_ylabel("|activation| (bin)")
    bar = fig.colorbar(ax.get_images()[-1], ax=ax, fraction=0.08, pad=0.03)
    bar.set_label("log(1 + count)", fontsize=REPORT_FONT["label"])
    bar.ax.tick_params(labelsize=REPORT_FONT["tick"])
    _small_text(ax)
    return fig


def _positive_range(values) -> tuple[float, float] | None:
    """(min, max) of the finite positive values, or None when there are none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    return (float(values.min()), float(values.max())) if values.size else None


def layer_heatmap(stats, field: str, modules: Sequence[str] | None = None, ax=None, *, title: str, label: str,
                  log: bool = False, center: float | None = None, vmin: float | None = None,
                  vmax: float | None = None, highlight: Sequence[str] = ()):
    """One row per layer, one column per recorded step, colour = `stats.<field>` (with a labelled colour
    bar): every layer at a glance instead of a tangle of lines. `field` is a (T, M) array over
    `stats.modules`, or over `stats.param_modules` for update_ratio, param_grad_norm and weight_norm.
    `log`: logarithmic colours; `center`: logarithmic colours symmetric about this value on a diverging
    map (the update ratio about 1e-3). Grey: not measured. Layers in `highlight` (flagged by a finding)
    get a red name. Layers with no finite value at all are left out."""
    from matplotlib.colors import LogNorm, Normalize

    owner = stats.param_modules if field in ("update_ratio", "param_grad_norm", "weight_norm") else stats.modules
    values = np.asarray(getattr(stats, field), dtype=float)
    cols = [(i, n) for i, n in _names(owner, modules) if np.isfinite(values[:, i]).any()]
    fig, ax = _axes(ax, figsize=(6.2, max(2.6, 1.0 + 0.24 * len(cols))))
    image = values[:, [i for i, _ in cols]].T if cols else np.full((1, max(len(stats.steps), 1)), np.nan)
    cmap = plt.get_cmap("coolwarm" if center else "viridis").with_extremes(bad="0.85")
    span = _positive_range(image) if (log or center) else None
    if center and span:
        k = max(center / span[0], span[1] / center, 10.0)
        norm = LogNorm(center / k, center * k)
    elif log and span:
        norm = LogNorm(vmin or span[0], vmax or max(span[1], span[0] * 1.0001))
        image = np.where(image > 0, image, np.nan)  # log colours: zero or below is shown as not measured
    else:
        norm = Normalize(vmin, vmax)
    if center and span:
        image = np.where(image > 0, image, np.nan)
    im = ax.imshow(np.ma.masked_invalid(image), aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    _step_ticks(ax, stats.steps)
    names = [n for _, n in cols]
    ax.set_yticks(range(len(names)), names)
    for tick, name in zip(ax.get_yticklabels(), names):
        literal(tick)
        if name in highlight:
            tick.set(color="#c62828", fontweight="bold")
    ax.set_title(title, **LITERAL)
    ax.set(xlabel="training step", ylabel="layer")
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label(label, fontsize=REPORT_FONT["label"])
    bar.ax.tick_params(labelsize=REPORT_FONT["tick"])
    if center and span:
        bar.ax.axhline(center, color="k", lw=1)
    _small_text(ax)
    return fig


def layer_panels(stats, module: str, *, shared: bool = True):
    """Small multiples for one layer, one row of five panels in the same place for every layer: the
    |activation| histogram over training (with its colour bar), activation mean and std, the fraction of
    "off" values (0-1), gradient norms (output and parameters) and the update / weight ratio (with the
    ~1e-3 reference; "owns no parameters" otherwise). `shared`: the gradient and update panels use the
    same log y range for every layer, so two layers' panels compare at a glance."""
    fig, axs = subplots(1, 5, figsize=(14, 2.7), gridspec_kw={"width_ratios": [1.3, 1, 1, 1, 1]})
    ((i, _),) = _names(stats.modules, [module])
    steps = stats.steps
    color_dim_panel(stats, module, ax=axs[0], title="|activation| histogram")

    ax = axs[1]
    lines = [ax.plot(steps, stats.act_mean[:, i], lw=1.2, label="mean")[0],
             ax.plot(steps, stats.act_std[:, i], lw=1.2, label="std")[0]]
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set(title="activation mean and std", xlabel="training step", ylabel="value (output units)")
    _report_legend(ax, lines)

    ax = axs[2]
    rules = stats.dead_rules or []
    rule = rules[i].split(":", 1)[0] if i < len(rules) else f"|a| ≤ {float(stats.dead_threshold):.2g}"
    ax.plot(steps, stats.act_dead[:, i], lw=1.2, color="tab:red")
    ax.set(title=f"off fraction ({rule})", xlabel="training step", ylabel="fraction of values (0-1)", ylim=(-0.02, 1.02))
    ax.title.set(**LITERAL)

    j = list(stats.param_modules).index(module) if module in stats.param_modules else None
    ax = axs[3]
    grads = [("output gradient", stats.grad_norm[:, i])]
    if j is not None:
        grads.append(("parameter gradient", stats.param_grad_norm[:, j]))
    grads = [(name, g) for name, g in grads if np.isfinite(g).any() and (np.asarray(g)[np.isfinite(g)] > 0).any()]
    ax.set(title="gradient norm", xlabel="training step", ylabel="L2 norm (log)")
    if grads:
        lines = [ax.plot(steps, g, lw=1.2, label=name, color=f"C{k + 2}")[0] for k, (name, g) in enumerate(grads)]
        ax.set_yscale("log")
        _report_legend(ax, lines)
        span = _positive_range(np.concatenate([np.ravel(stats.grad_norm), np.ravel(stats.param_grad_norm)])) if shared else None
        if span:
            ax.set_ylim(span[0] / 1.5, span[1] * 1.5)
    else:
        ax.text(0.5, 0.5, "no gradient recorded", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set(xticks=[], yticks=[])

    ax = axs[4]
    ax.set(title="update / weight ratio", xlabel="training step", ylabel="||Δw|| / ||w|| (log)")
    ratio = stats.update_ratio[:, j] if j is not None else None
    if ratio is not None and np.isfinite(ratio).any() and (ratio[np.isfinite(ratio)] > 0).any():
        line = ax.plot(steps, ratio, lw=1.2, color="tab:purple", label="update ratio")[0]
        reference = ax.axhline(UPDATE_RATIO_REFERENCE, color="k", ls="--", lw=1.2, alpha=0.6, label="1e-3 reference")
        ax.set_yscale("log")
        span = _positive_range(stats.update_ratio) if shared else _positive_range(ratio)
        if span:
            ax.set_ylim(min(span[0], UPDATE_RATIO_REFERENCE) / 1.5, max(span[1], UPDATE_RATIO_REFERENCE) * 1.5)
        _report_legend(ax, [line, reference])
    else:
        ax.text(0.5, 0.5, "owns no parameters" if j is None else "not measured", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set(xticks=[], yticks=[])
    for ax in axs[1:]:
        if not ax.texts:  # a panel saying "owns no parameters" keeps no ticks
            ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        _small_text(ax)
    # fixed margins: tight_layout would measure every tick label once more (half the time of a figure)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.2, top=0.88, wspace=0.55)
    return fig
