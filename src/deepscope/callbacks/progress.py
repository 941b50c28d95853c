"""Progress: a bar per pass, a table row per epoch, and in Jupyter a live train/valid loss plot."""
from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm as std_tqdm

from ..callback import Callback
from .metrics import MetricsCallback


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where bars can be widgets and figures can be updated in place)."""
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def bar_class():
    """tqdm's widget bar in a notebook that has ipywidgets; its plain-text bar everywhere else (tqdm.auto
    without ipywidgets warns and draws nothing)."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401

            from tqdm.notebook import tqdm as notebook_tqdm
            return notebook_tqdm
        except ImportError:
            pass
    return std_tqdm


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


# An epoch in which this process got less than this share of its threads' time (CPU seconds over wall
# seconds x torch threads) ran on a busy machine: other processes took the cores. On a quiet machine a CPU
# training step keeps its threads busy 80-95% of the time; below half, the epoch took twice as long.
BUSY_CPU_SHARE = 0.5


class ProgressCallback(Callback):
    """Bars show the running loss (read back every `refresh_every` batches, not every step); each epoch
    prints one table row from the MetricsCallback. `bars=None` shows bars only on a terminal/notebook.

    Once per fit, after an epoch of 2 s or more on the CPU in which the process got less than
    BUSY_CPU_SHARE of its threads' time, it prints a hint that the machine is busy and epochs are slow
    for that reason (`clock` gives (wall seconds, process CPU seconds); tests pass their own)."""

    order = 30
    in_lr_sweep = False

    def __init__(self, bars: bool | None = None, table: bool = True, plot: bool | None = None,
                 refresh_every: int = 20, file=None, mininterval: float = 0.1, display=None, clock=None):
        self.bars, self.table, self.refresh_every = bars, table, refresh_every
        self.plot = in_notebook() if plot is None else plot
        self.file, self.mininterval = file, mininterval
        self.display = display  # Jupyter's IPython.display.display unless given (tests pass their own)
        self._bar = None
        self._columns: list[str] = []
        self._widths: list[int] = []
        self._plot_handle = None
        self._valid_points: list[tuple[int, float]] = []
        self.clock = clock or (lambda: (time.perf_counter(), time.process_time()))
        self._epoch_start: tuple[float, float] | None = None
        self._hinted = False

    def _print(self, text: str) -> None:
        bar_class().write(text, file=self.file or sys.stdout)

    def before_fit(self, learn) -> None:
        self._columns, self._valid_points, self._hinted = [], [], False

    def before_epoch(self, learn) -> None:
        self._epoch_start = self.clock()

    def busy_hint(self, learn) -> str | None:
        """The hint for the epoch just ended, or None: only on the CPU, once per fit."""
        if self._epoch_start is None or self._hinted:
            return None
        param = next(learn.model.parameters(), None)
        if param is not None and param.device.type != "cpu":
            return None
        from .. import distributed
        from .training import Compile

        if distributed.world_size() > 1:  # the job's processes share the cores, by design
            return None
        if learn.epoch == 0 and any(isinstance(cb, Compile) for cb in learn.cbs):
            return None  # torch.compile's workers (other processes) did part of this epoch's work
        (wall0, cpu0), (wall1, cpu1) = self._epoch_start, self.clock()
        wall, cpu, threads = wall1 - wall0, cpu1 - cpu0, torch.get_num_threads()
        if wall < 2.0 or cpu >= BUSY_CPU_SHARE * wall * threads:
            return None
        self._hinted = True
        return (f"hint: this epoch took {wall:.1f} s of wall time but only {cpu:.1f} s of CPU time on {threads} "
                f"thread{'s' if threads != 1 else ''} ({cpu / (wall * threads):.0%} of them): other processes are "
                f"using the cores, so epochs are slower than this machine can train. Close them, or pass "
                f"--threads with fewer threads than cores.")

    def _open_bar(self, learn, desc: str) -> None:
        disable = None if self.bars is None else not self.bars
        self._bar = bar_class()(total=learn.n_iter, desc=desc, leave=False, disable=disable, file=self.file,
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
        hint = self.busy_hint(learn)
        if hint:
            self._print(hint)
        if self.plot:
            self._update_plot(learn)

    def _update_plot(self, learn) -> None:
        """Redraw the loss figure in place (Jupyter only)."""
        from .recorder import Recorder

        recorder = learn.get_cb(Recorder)
        if recorder is None:
            return
        image = _png_image(loss_figure(recorder.losses_so_far(), self._valid_points))
        if self._plot_handle is None:
            show = self.display or _ipython_display
            self._plot_handle = show(image, display_id=True)
        else:
            self._plot_handle.update(image)


def _png_image(fig):
    """The figure as a PNG image Jupyter shows as an image in any kernel (a bare Figure shows as the text
    "<Figure size ...>" until %matplotlib inline registers matplotlib's formatter)."""
    from ..plots import figure_to_png

    png = figure_to_png(fig)
    try:
        from IPython.display import Image
    except ImportError:  # outside IPython (a test's own display): the PNG bytes
        return png
    return Image(data=png, format="png")


def _ipython_display(obj, display_id: bool = True):
    from IPython.display import display

    return display(obj, display_id=display_id)


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
