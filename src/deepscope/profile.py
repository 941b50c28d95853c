"""`--profile N`: record N training steps with torch.profiler, and keep the trace and its top operators.

`Profile` starts torch.profiler at the first training pass of the fit, steps it after each training batch
that ran, and stops it at the end of that pass, so the profile holds training steps only. Its schedule
skips WAIT steps (the first step allocates memory, initialises lazily and tunes cuDNN), warms up for WARMUP
(the profiler's own start-up) and records N. A pass too short for that skips less (no wait, then a
shorter warm-up) and records what is left; `profile_ops.json` says so. Into the run folder go:

    profile_trace.json  the trace, for https://ui.perfetto.dev or chrome://tracing
    profile_ops.json    the operators with the most self time (see `top_operators`), which the report shows

Profiling slows the steps it records (and, a little, the whole first pass): PhaseTimer's numbers for that
epoch include its cost.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

from .callback import Callback
from .errors import ConfigError, DataError
from .runfolder import PROFILE_OPS, PROFILE_TRACE, read_json, write_json

WAIT, WARMUP = 1, 1  # steps skipped, then steps the profiler warms up in, before the N it records
TOP = 15  # operators listed per kind of time
PERFETTO = "https://ui.perfetto.dev"


def plan(n_batches: int | None, steps: int) -> tuple[int, int]:
    """(wait, warmup) before recording `steps` in a training pass of `n_batches` (None: unknown, planned as
    long enough). A short pass loses its wait first, then its warm-up (a single batch has none)."""
    if n_batches is None or n_batches >= WAIT + WARMUP + steps:
        return WAIT, WARMUP
    return 0, min(WARMUP, max(n_batches - 1, 0))


class Profile(Callback):
    """Record `steps` training steps of the first training pass with torch.profiler (CPU, and CUDA when
    the model is on a CUDA device; no shapes) and write PROFILE_TRACE and PROFILE_OPS into `folder`.
    After the fit: `profiled` is the number of steps recorded, `note` says why it is fewer than asked, and
    `failed` why nothing could be written (a failure to write never stops training). ConfigError for a
    `steps` that is not a positive integer."""

    order = 95  # its step closes after the other callbacks' cleanup_batch, so each recorded step holds them
    in_lr_sweep = False

    def __init__(self, steps: int, folder: str | Path):
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"profile: the number of steps to record must be a positive integer, got {steps!r}")
        self.steps, self.folder = steps, Path(folder)
        self.profiled, self.note, self.failed = 0, None, None
        self._prof = None
        self._done = False

    def before_fit(self, learn) -> None:
        self.profiled, self.note, self.failed, self._done = 0, None, None, False

    def before_train(self, learn) -> None:
        if self._done:
            return
        self._done, self._ran, self._taken, self._written = True, False, 0, False
        self._wait, self._warmup = plan(learn.n_iter, self.steps)  # n_iter: as LimitBatches (-10) lowered it
        param = next(learn.model.parameters(), None)
        self._cuda = param is not None and param.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else [])
        schedule = torch.profiler.schedule(wait=self._wait, warmup=self._warmup, active=self.steps, repeat=1)
        self._prof = torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False,
                                            on_trace_ready=self._write)
        with warnings.catch_warnings():  # a schedule without warm-up (a one-batch pass) warns that it may skew
            warnings.simplefilter("ignore")
            self._prof.start()

    def after_pred(self, learn) -> None:
        self._ran = True  # a batch cancelled before its forward pass (LimitBatches) is no step

    def cleanup_batch(self, learn) -> None:
        if self._prof is not None and learn.training and self._ran:
            self._ran = False
            self._taken += 1
            self._prof.step()

    def cleanup_train(self, learn) -> None:
        self._stop()

    def cleanup_fit(self, learn) -> None:
        self._stop()  # a fit that stopped inside its first training pass
        if self._done and not self._written and self.failed is None:
            self.note = (f"no step was recorded: the first training pass ran {self._taken} step(s), fewer than "
                         f"the {self._wait + self._warmup} skipped and warmed up in before recording")
            self._guarded(lambda: write_json(self.folder / PROFILE_OPS, self._summary(None, None)))

    def _stop(self) -> None:
        prof, self._prof = self._prof, None
        if prof is not None:
            self._guarded(prof.stop)  # in the middle of recording, this writes what was recorded

    def _write(self, prof) -> None:
        """torch.profiler's on_trace_ready: the recording is over."""
        self.profiled = min(self.steps, max(self._taken - self._wait - self._warmup, 0))
        if self.profiled < self.steps:
            self.note = (f"the first training pass ran {self._taken} step(s), so {self.profiled} of the {self.steps} "
                         f"asked for were recorded (after {self._wait} skipped and {self._warmup} warm-up)")

        def write() -> None:
            trace = self.folder / PROFILE_TRACE
            partial = trace.with_name(trace.name + ".tmp")
            prof.export_chrome_trace(str(partial))
            os.replace(partial, trace)  # a reader never sees half a trace
            write_json(self.folder / PROFILE_OPS, self._summary(prof.key_averages(), PROFILE_TRACE))
            self._written = True

        self._guarded(write)

    def _summary(self, averages, trace: str | None) -> dict:
        return {"steps": self.steps, "profiled_steps": self.profiled, "wait": self._wait, "warmup": self._warmup,
                "activities": ["cpu", "cuda"] if self._cuda else ["cpu"], "trace": trace, "note": self.note,
                **(top_operators(averages, device=self._cuda) if averages is not None else {"cpu": None, "cuda": None})}

    def _guarded(self, step) -> None:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - a failed profile must not stop training
            self.failed = f"{type(e).__name__}: {e}"
            print(f"deepscope: warning: could not write the profile ({self.failed}); training goes on",
                  file=sys.stderr)


def top_operators(averages, n: int = TOP, device: bool = False) -> dict:
    """The `n` operators with the most self CPU time (and self CUDA time when `device`) from
    `profile.key_averages()`: {"cpu": {"total_ms", "ops": [{"name", "calls", "self_ms", "total_ms",
    "percent"}]}, "cuda": the same or None}. `percent` is the share of all self time of that kind in the
    profile (ProfilerStep#k entries, the step's own Python work, count in the total but are not listed)."""
    events = list(averages)
    kinds = {"cpu": ("self_cpu_time_total", "cpu_time_total")}
    if device:
        kinds["cuda"] = ("self_device_time_total", "device_time_total")
    out: dict = {"cpu": None, "cuda": None}
    for kind, (self_attr, total_attr) in kinds.items():
        total_us = sum(getattr(e, self_attr, 0) for e in events)
        ops = sorted((e for e in events if not e.key.startswith("ProfilerStep") and getattr(e, self_attr, 0) > 0),
                     key=lambda e: -getattr(e, self_attr))[:n]
        out[kind] = {"total_ms": total_us / 1000, "ops": [
            {"name": e.key, "calls": int(e.count), "self_ms": getattr(e, self_attr) / 1000,
             "total_ms": getattr(e, total_attr) / 1000,
             "percent": 100 * getattr(e, self_attr) / total_us if total_us else None} for e in ops]}
    return out


def load_profile(run_dir: str | Path) -> dict | None:
    """PROFILE_OPS of a run folder, every key present (None where the file lacks it), with "trace_present"
    (whether PROFILE_TRACE is there); None when the run was not profiled. DataError naming the file when
    it is malformed."""
    path = Path(run_dir) / PROFILE_OPS
    if not path.is_file():
        return None
    data = read_json(path, dict)
    out = {key: data.get(key) for key in ("steps", "profiled_steps", "wait", "warmup", "note", "trace")}
    for kind in ("cpu", "cuda"):
        table = data.get(kind)
        if table is not None and not (isinstance(table, dict) and isinstance(table.get("ops"), list)
                                      and all(isinstance(op, dict) and "name" in op for op in table["ops"])):
            raise DataError(f"{path}: {kind!r} should hold {{'total_ms', 'ops': [operators]}}; re-create the run, "
                            f"or move the file away")
        out[kind] = None if table is None else {"total_ms": table.get("total_ms"), "ops": [
            {"name": str(op["name"]), **{k: op.get(k) for k in ("calls", "self_ms", "total_ms", "percent")}}
            for op in table["ops"]]}
    out["trace_present"] = (Path(run_dir) / PROFILE_TRACE).is_file()
    return out
