"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""


class DeepscopeError(Exception):
    """Base class: the message says what was wrong and what to do about it."""


class DataError(DeepscopeError):
    """A data file or folder is missing, corrupt, or does not match what was expected."""


class ConfigError(DeepscopeError):
    """An option or config value is out of range, of the wrong type, or unknown."""


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
