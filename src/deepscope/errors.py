"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""


class DeepscopeError(Exception):
    """Base class: the message says what was wrong and what to do about it."""


class DataError(DeepscopeError):
    """A data file or folder is missing, corrupt, or does not match what was expected."""


class ConfigError(DeepscopeError, ValueError):
    """An option or config value is out of range, of the wrong type, or unknown (a ValueError too, so
    code that catches ValueError for bad arguments keeps working)."""


class OutputError(DeepscopeError):
    """The output folder cannot be written."""


class CheckpointError(DeepscopeError):
    """A checkpoint does not fit the model it is loaded into."""


class ExportError(DeepscopeError):
    """A model could not be exported, or the exported file does not reproduce it (deepscope.export)."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (Ctrl-C, SIGTERM); raised where it was, so cleanup runs."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(signal.Signals(signum).name)


# The stop signal received, if any. Python raises a signal handler's exception wherever the main thread
# is, and one raised inside a finaliser or a weakref callback is printed and swallowed: this remembers
# the request so that the next safe point (`raise_pending_interrupt`) still stops. Process-wide, as
# signals are; set only by the CLI's handlers.
_pending: list[int] = []


def request_interrupt(signum: int) -> None:
    """A signal handler's body: remember the request, then raise Interrupted where the program is."""
    _pending.append(signum)
    raise Interrupted(signum)


def raise_pending_interrupt(at_batch_boundary: bool = False) -> None:
    """Raise Interrupted if a stop was requested and not yet acted on (see `_pending`). The Learner passes
    `at_batch_boundary` between batches: the exception then says that the fit's state is whole there."""
    if _pending:
        e = Interrupted(_pending.pop())
        e.at_batch_boundary = at_batch_boundary
        _pending.clear()
        _agreed.clear()
        raise e


def clear_pending_interrupt() -> None:
    _pending.clear()
    _agreed.clear()


def request_stop(signum: int) -> None:
    """Ask for a stop at the next batch boundary without raising (a stop another rank received)."""
    if not _pending:
        _pending.append(signum)


_agreed: list[bool] = []  # under DDP: the pending stop was agreed by every rank (Checkpoint's agreement)


def agree_stop() -> None:
    """Every rank agreed on the pending stop: the Learner may act on it (see `stop_due`)."""
    _agreed[:] = [True]


def stop_due(distributed_job: bool) -> bool:
    """Whether the Learner should act on a pending stop now: at once in one process; under DDP only once
    every rank has agreed on it, so that all stop at the same boundary."""
    return bool(_pending) and (not distributed_job or bool(_agreed))


def stop_requested() -> int | None:
    """The signal of a stop asked for and not yet acted on, or None."""
    return _pending[-1] if _pending else None


_deferring: list[bool] = []  # one entry per active `stops_at_boundaries`


def deferring_stops() -> bool:
    """Whether Ctrl-C and SIGTERM now wait for the Learner's next batch boundary (`stops_at_boundaries`)."""
    return bool(_deferring)


class stops_at_boundaries:
    """While active (main thread only; elsewhere it does nothing), the first Ctrl-C or SIGTERM does not raise
    where the program is: it is remembered, a line says the run will stop after this batch, and the
    Learner raises Interrupted at its next training-batch boundary (or the next epoch's start), where a
    checkpoint of the whole state can be written. A second Ctrl-C stops at once, as usual; a SIGTERM while
    already stopping changes nothing (launchers such as torchrun forward one after the user's Ctrl-C). The
    handlers in force before are put back on exit. Used by the Checkpoint callback from before_fit to cleanup_fit."""

    def __init__(self, say=None):
        self.say = say or (lambda m: print(m, file=__import__("sys").stderr, flush=True))
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        import signal

        if _pending:
            if signum == signal.SIGINT and _pending[0] == signal.SIGINT:  # Ctrl-C twice: stop now
                request_interrupt(signum)
            return  # already stopping (a launcher such as torchrun forwards SIGTERM after the user's Ctrl-C)
        _pending.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        from . import distributed

        if distributed.is_main():
            # under torchrun a second Ctrl-C reaches the processes as SIGTERM, which a stop in progress ignores
            now = ("to stop at once, kill the job" if distributed.launched() else
                   "press Ctrl-C again to stop at once" if signum == signal.SIGINT else "Ctrl-C stops at once")
            self.say(f"deepscope: {name}: stopping at the next batch boundary and writing a checkpoint ({now})")

    def __enter__(self) -> "stops_at_boundaries":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
            _deferring.append(True)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._previous:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._previous = {}
            _deferring.pop()


def check_number(who: str, name: str, value, *, minimum: float = 0.0, inclusive: bool = False) -> float:
    """`value` as a float, or ConfigError naming `who` and `name` when it is not a finite number above
    `minimum` (at or above it when `inclusive`)."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f"{'at least' if inclusive else 'above'} {minimum:g}"
        raise ConfigError(f"{who}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)
