"""Progress: a bar per pass, a table row per epoch, and in Jupyter a live train/valid loss plot."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

from ..callback import Callback
from .metrics import MetricsCallback


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where tqdm.auto draws widgets and figures can be updated in place)."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def format_row(record: dict, columns: list[str], widths: list[int]) -> str:
    cells = []
    for col, width in zip(columns, widths):
        value = record.get(col)
        if value is None:
            text = "-"
        elif col == "epoch":
            text = str(value)
        elif col == "seconds":
            text = f"{value:.1f}"
        else:
            text = f"{value:.4f}"
        cells.append(text.rjust(width))
    return "  ".join(cells)


class ProgressCallback(Callback):
    """Bars show the running loss (read back every `refresh_every` batches, not every step); each epoch
    prints one table row from the MetricsCallback. `bars=None` shows bars only on a terminal/notebook."""

    order = 30
    in_lr_sweep = False

    def __init__(self, bars: bool | None = None, table: bool = True, plot: bool | None = None,
                 refresh_every: int = 20, file=None, mininterval: float = 0.1, display=None):
        self.bars, self.table, self.refresh_every = bars, table, refresh_every
        self.plot = in_notebook() if plot is None else plot
        self.file, self.mininterval = file, mininterval
        self.display = display  # Jupyter's IPython.display.display unless given (tests pass their own)
        self._bar = None
        self._columns: list[str] = []
        self._widths: list[int] = []
        self._plot_handle = None
        self._valid_points: list[tuple[int, float]] = []

    def _print(self, text: str) -> None:
        tqdm.write(text, file=self.file or sys.stdout)

    def before_fit(self, learn) -> None:
        self._columns, self._valid_points = [], []

    def _open_bar(self, learn, desc: str) -> None:
        disable = None if self.bars is None else not self.bars
        self._bar = tqdm(total=learn.n_iter, desc=desc, leave=False, disable=disable, file=self.file,
                         dynamic_ncols=True, mininterval=self.mininterval)

    def before_train(self, learn) -> None:
        self._open_bar(learn, f"epoch {learn.epoch + 1}/{learn.n_epochs} train")

    def before_validate(self, learn) -> None:
        self._open_bar(learn, f"epoch {learn.epoch + 1}/{learn.n_epochs} valid")

    def after_batch(self, learn) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        if learn.iter % self.refresh_every == 0 and not self._bar.disable:
            self._bar.set_postfix(loss=f"{learn.loss.item():.4f}", refresh=False)
        if self.plot and learn.training and learn.iter % self.refresh_every == 0:
            self._update_plot(learn)

    def _close_bar(self, learn) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    cleanup_train = cleanup_validate = _close_bar

    def after_epoch(self, learn) -> None:
        metrics = learn.get_cb(MetricsCallback)
        if metrics is None or not metrics.history:
            return
        record = metrics.history[-1]
        if record.get("valid_loss") is not None:
            self._valid_points.append((learn.train_iter, record["valid_loss"]))
        if not self.table:
            return
        if not self._columns:
            self._columns = list(record)
            self._widths = [max(len(c), 8) for c in self._columns]
            self._print("  ".join(c.rjust(w) for c, w in zip(self._columns, self._widths)))
        self._print(format_row(record, self._columns, self._widths))
        if self.plot:
            self._update_plot(learn)

    def _update_plot(self, learn) -> None:
        """Redraw the loss figure in place (Jupyter only)."""
        from .recorder import Recorder

        recorder = learn.get_cb(Recorder)
        if recorder is None:
            return
        fig = loss_figure(recorder.losses_so_far(), self._valid_points)
        if self._plot_handle is None:
            show = self.display or _ipython_display
            self._plot_handle = show(fig, display_id=True)
        else:
            self._plot_handle.update(fig)


def _ipython_display(fig, display_id: bool = True):
    from IPython.display import display

    return display(fig, display_id=display_id)


def loss_figure(train_losses: list[float], valid_points: list[tuple[int, float]]):
    """Train loss per batch and valid loss per epoch; a bare Figure (no pyplot state to leak)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(len(train_losses)), train_losses, label="train")
    if valid_points:
        ax.plot(*zip(*valid_points), "o-", label="valid")
    ax.set_xlabel("batch")
    ax.set_ylabel("loss")
    ax.legend()
    return fig
