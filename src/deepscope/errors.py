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


def raise_pending_interrupt() -> None:
    """Raise Interrupted if a stop was requested and not yet acted on (see `_pending`)."""
    if _pending:
        raise Interrupted(_pending.pop())


def clear_pending_interrupt() -> None:
    _pending.clear()


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
