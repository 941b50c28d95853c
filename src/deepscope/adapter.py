"""What the adapters over the recording engine share (`watch`, the Lightning callback): a loss log kept
on the device, diagnosis of a record, and a report written without a run folder."""
from __future__ import annotations

from pathlib import Path

import torch

from .stats.format import Stats

LOSS_BLOCK = 64  # step losses kept on the device before one read-back


class LossLog:
    """One training loss per step, kept as device tensors and read back `LOSS_BLOCK` at a time, so
    logging a loss never synchronises the host with the device inside a step."""

    def __init__(self):
        self._values: list[float] = []
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor | float) -> None:
        """The step's loss: a one-value tensor or a number. ConfigError for a loss of several values (an
        unreduced loss, reduction="none"): reduce it first, e.g. loss.mean()."""
        if isinstance(loss, torch.Tensor) and loss.numel() != 1:
            from .errors import ConfigError

            raise ConfigError(f"the loss given for a step has shape {tuple(loss.shape)}: pass one value per step "
                              f"(reduce it, e.g. loss.mean(), as backward() needs anyway)")
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if self._pending and value.device != self._pending[0].device:
            self.read()
        self._pending.append(value)
        if len(self._pending) >= LOSS_BLOCK:
            self.read()

    def read(self) -> None:
        """Move the pending losses to the host (one read-back)."""
        if self._pending:
            self._values.extend(torch.stack(self._pending).cpu().tolist())
            self._pending = []

    @property
    def values(self) -> list[float]:
        self.read()
        return list(self._values)


def analysis_of(stats: Stats, losses: list[float], n_classes: int | None = None, also: list = (),
                also_checked: list[str] = (), also_skipped: list[tuple[str, str]] = ()):
    """The one analysis (deepscope.diagnose.analysis.analyse_run) of a record and its losses, with the
    adapter's own findings `also` from the checks named in `also_checked`: an `Analysis` (findings causes
    first, and what was checked)."""
    from .diagnose.analysis import Record, analyse_run

    return analyse_run(Record(list(losses), stats, n_classes, extra=list(also), extra_checks=list(also_checked),
                              extra_skipped=list(also_skipped)))


def findings_of(stats: Stats, losses: list[float], n_classes: int | None = None, also: list = ()) -> list:
    """The findings of `analysis_of`, causes first."""
    return analysis_of(stats, losses, n_classes, also).findings


def report_path(path: str | Path) -> Path:
    """`path` itself when it ends in .html, else `path/report.html`; the folder is made if missing."""
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    return path / "report.html"


def write_report(path: str | Path, *, title: str, settings: dict, stats: Stats, losses: list[float],
                 findings: list, device: torch.device | str, wall_seconds: float | None) -> Path:
    """A self-contained report.html of a record held in memory (no run folder); returns the file."""
    from .report import render_run
    from .runfolder import environment, write_text

    path = report_path(path)
    run = {"dir": path.parent, "title": title,
           "config": {"config": settings, "environment": environment(device), "data": {}, "wall_seconds": wall_seconds},
           "metrics": [], "recorder": {"loss": losses} if losses else None,
           "findings": [f.to_dict() for f in findings], "lr_find": None, "ablation": None, "stats": stats}
    write_text(path, render_run(run))
    return path
