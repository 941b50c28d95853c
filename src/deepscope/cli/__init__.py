"""The `deepscope` command. Each sub-command lives in its own module exposing `add_parser(subparsers)`,
which registers the sub-command and sets `func(args) -> int` as its handler."""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading

from ..cpu_memory import keep_freed_memory
from ..errors import DeepscopeError, Interrupted, clear_pending_interrupt, request_interrupt
from .options import EVERY_RANK, RANK0_WAITED

# Module names under deepscope.cli, in the order `deepscope --help` lists them.
SUBCOMMANDS = ("train", "report", "compare", "runs", "export", "doctor", "lr_find", "ablate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepscope",
        description="Train a neural network while looking inside it: per-layer statistics, plots, "
        "an HTML report and plain-words diagnosis.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"deepscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def _raise_interrupted(signum, frame) -> None:
    request_interrupt(signum)


# What to do about an OSError while reading or writing files, by errno.
_OS_ADVICE = {errno.ENOSPC: "free some disk space, or write somewhere else",
              errno.EDQUOT: "free some space within your quota, or write somewhere else",
              errno.EFBIG: "the file grew past a size limit (ulimit -f); raise it, or write somewhere else",
              errno.EACCES: "check the permissions, or write somewhere else",
              errno.EROFS: "the filesystem is read-only; write somewhere else",
              errno.EIO: "the disk reported an I/O error; check it"}


def _user_error(e: BaseException) -> BaseException | None:
    """The error a user can act on behind `e` (a callback may wrap it): a DeepscopeError or an OSError
    about a file."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DeepscopeError) or (isinstance(e, OSError) and e.errno in _OS_ADVICE):
            return e
        e = getattr(e, "error", None) or e.__cause__
    return None


def _caused_by(e: BaseException, kind: type) -> bool:
    """Whether `e` is, or was caused by (a callback wraps it), an exception of type `kind`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        e = getattr(e, "error", None) or e.__cause__
    return False


def _message(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}; {_OS_ADVICE[e.errno]}"
    return str(e)


def main(argv: list[str] | None = None) -> int:
    from .. import distributed

    # Under torchrun with several processes (distributed.launched), only rank 0 speaks: argparse's errors and
    # --help too. How the command itself runs there is its parser's `ddp` (options.EVERY_RANK, RANK0_WAITED);
    # a command that sets none is a single-process command, which rank 0 alone runs.
    follower = distributed.launched_rank() != 0
    with _silenced(follower):
        args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # which options were given (train --resume)
    ddp = getattr(args, "ddp", None) if distributed.launched() else EVERY_RANK
    if ddp is None:
        if follower:
            return 0
        others = distributed.planned_world_size() - 1
        print(f"deepscope {args.command}: a single-process command; under torchrun rank 0 runs it and the other "
              f"{others} process{'es' if others != 1 else ''} exit{'s' if others == 1 else ''} at once", file=sys.stderr)
    if ddp == RANK0_WAITED and follower:
        return _rank0s_code(None)
    try:
        code = _run(args)
    except Exception:
        if ddp == RANK0_WAITED:
            _rank0s_code(1)  # the others exit too, before the traceback is printed here
        raise
    return _rank0s_code(code) if ddp == RANK0_WAITED else code


@contextlib.contextmanager
def _silenced(quiet: bool):
    """Nothing printed inside, when `quiet`."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# How long the other processes wait for a RANK0_WAITED command of rank 0 (torchrun stops them at once if rank 0
# dies): a day.
RANK0_WAIT_S = 24 * 3600


def _rank0s_code(code: int | None) -> int:
    """Rank 0's exit code, on every process of a torchrun job: rank 0 passes it once its command is done; the
    others, called at once, wait for it in a process group joined only now (on the host: gloo), so that rank
    0's command ran as a single process."""
    from .. import distributed

    distributed.init(backend="gloo", timeout_s=RANK0_WAIT_S)
    try:
        return int(distributed.broadcast_object(code))
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; a user's error becomes one message on stderr and exit code 2."""
    from .. import distributed

    keep_freed_memory()  # a deepscope process trains: stop the per-step page faults (cpu_memory.py)
    name = f"deepscope {args.command}"
    # SIGTERM stops the run the way Ctrl-C does, so the run folder is finished or abandoned cleanly.
    on_main = threading.current_thread() is threading.main_thread()
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _raise_interrupted) for s in stops} if on_main else {}
    clear_pending_interrupt()
    try:
        code = int(args.func(args) or 0)
        if distributed.active():
            distributed.barrier()  # every rank is done before any leaves the group (a rank leaving early aborts the rest)
        return code
    except KeyboardInterrupt as e:
        clear_pending_interrupt()
        term = isinstance(e, Interrupted) and e.signum == signal.SIGTERM
        if distributed.is_main():  # under torchrun every rank stops; rank 0 says so
            print(f"{name}: {'terminated (SIGTERM)' if term else 'interrupted'}", file=sys.stderr)
            _outcome(e)
        return 143 if term else 130
    except Exception as e:  # noqa: BLE001 - user errors become one message; anything else is re-raised
        if _caused_by(e, BrokenPipeError):  # the output was closed (`| head`): stop quietly, as other tools do
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
            _outcome(e)
            return 1
        user = _user_error(e)
        if user is None:
            raise
        if not getattr(user, "told_by_rank0", False):  # an error rank 0 met is printed by rank 0 alone
            where = f"[rank {distributed.rank()}] " if distributed.active() and not distributed.is_main() else ""
            print(f"{name}: {where}error: {_message(user)}", file=sys.stderr)
            _outcome(e)
        return 2
    finally:
        for sig, handler in previous.items():
            _restore_handler(sig, handler)
        if sys.exc_info()[0] is None:  # after an error, other ranks may be inside a collective: just exit
            distributed.shutdown()


def _restore_handler(sig: int, handler) -> None:
    """Put back a signal's handler. A stop signal that lands while leaving (a second Ctrl-C, or torchrun's
    SIGTERM after the first) is raised by our own handler here: the command is ending anyway, so it is
    dropped rather than turned into a traceback."""
    while True:
        try:
            signal.signal(sig, handler)
            return
        except KeyboardInterrupt:
            continue


def _outcome(e: BaseException) -> None:
    """Say what happened to the run folder (set by deepscope.runfolder when it abandoned one)."""
    outcome = getattr(e, "run_folder_outcome", None)
    if outcome:
        print(f"  {outcome}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
