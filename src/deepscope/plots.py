"""Plots with matplotlib. Every function takes `ax=None`, returns the figure and never calls `plt.show()`,
so it works inline in Jupyter and headless (saved to PNG)."""
from __future__ import annotations

import base64
import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://", "nbagg", "widget", "ipympl")) else None
import matplotlib.pyplot as plt  # noqa: E402


def _axes(ax=None, figsize=(6, 3.5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_curve(values: Sequence[float], ax=None, *, title: str = "", xlabel: str = "", ylabel: str = "",
               smooth: int = 0, logy: bool = False):
    """One curve; `smooth > 1` overlays a moving average of that many points."""
    fig, ax = _axes(ax)
    ax.plot(range(len(values)), values, lw=0.8, alpha=0.6 if smooth > 1 else 1.0)
    if smooth > 1 and len(values) >= smooth:
        kernel = [1.0 / smooth] * smooth
        import numpy as np

        ax.plot(range(smooth - 1, len(values)), np.convolve(values, kernel, mode="valid"), lw=1.5)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
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
    acc = [r.get("valid_accuracy") for r in history]
    if any(v is not None for v in acc):
        ax2 = ax.twinx()
        ax2.plot(epochs, acc, "^--", color="tab:green", label="valid accuracy")
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="center right")
    ax.legend(loc="upper right")
    return fig


def figure_to_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def figure_to_data_uri(fig, dpi: int = 100) -> str:
    """A PNG as a data: URI, so a report can inline it and open with no network and no side files."""
    return "data:image/png;base64," + base64.b64encode(figure_to_png(fig, dpi)).decode("ascii")
