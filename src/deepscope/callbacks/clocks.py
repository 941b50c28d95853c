"""Clocks for timing a training loop without waiting for the device: marks taken on the host
(`time.perf_counter`) or on a CUDA stream (CUDA events), and `Intervals`, which adds up the time between
consecutive marks per phase once the clock has passed them (callbacks.timing.PhaseTimer uses them)."""
from __future__ import annotations

import time
from collections import deque

import torch

READ_EVERY = 256  # CUDA: every this many marks, read the events the GPU has passed (keeps the queue short)


class HostClock:
    """Marks are `time.perf_counter()` readings, in seconds."""

    def mark(self) -> float:
        return time.perf_counter()

    def passed(self, mark: float) -> bool:
        return True

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def wait(self) -> None:
        pass

    def release(self, mark: float) -> None:
        pass


class CudaClock:
    """Marks are CUDA events recorded on the device's current stream: recording one does not wait for the
    GPU. Events are reused once read, so a long epoch holds only those the GPU has not reached yet."""

    def __init__(self, device: torch.device):
        self.device, self._free = device, []

    def mark(self) -> torch.cuda.Event:
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def passed(self, event: torch.cuda.Event) -> bool:
        return event.query()  # does not wait

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def release(self, event: torch.cuda.Event) -> None:
        self._free.append(event)


def clock_for(model: torch.nn.Module) -> HostClock | CudaClock:
    """A CudaClock for a model whose (first) parameters are on a CUDA device, else a HostClock."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return CudaClock(param.device)
    return HostClock()


class Intervals:
    """Marks of one clock in a row; each closes the interval since the one before and charges it to a phase.
    `sums` holds the seconds per phase of the intervals read so far."""

    def __init__(self, clock):
        self.clock, self.sums = clock, {}
        self._at_once = isinstance(clock, HostClock)  # a host mark can be read as soon as it is taken
        self._queue: deque = deque()  # (phase, mark) not read yet; phase None: a new row starts here
        self._last = None  # the latest mark read

    def add(self, phase: str | None) -> None:
        """Take a mark; the interval since the previous one is `phase`'s (None: the first of a new row)."""
        if self._at_once:
            self._close(phase, self.clock.mark())
            return
        self._queue.append((phase, self.clock.mark()))
        if len(self._queue) % READ_EVERY == 0:
            self.read()

    def read(self, wait: bool = False) -> None:
        """Add up the intervals whose end the clock has passed (all of them with `wait`: one synchronize)."""
        if wait and self._queue:
            self.clock.wait()
        while self._queue and self.clock.passed(self._queue[0][1]):
            self._close(*self._queue.popleft())

    def _close(self, phase: str | None, mark) -> None:
        if self._last is not None:
            if phase is not None:
                self.sums[phase] = self.sums.get(phase, 0.0) + self.clock.seconds(self._last, mark)
            self.clock.release(self._last)
        self._last = mark
