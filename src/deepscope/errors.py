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
    """The process was asked to stop (SIGTERM); raised where it was, so cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(signal.Signals(signum).name)
