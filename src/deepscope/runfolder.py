"""The run folder's whole life: prepare -> write -> finish (or abandon). Nothing else in deepscope removes
files or names the files of a run.

A run is written into `<out>.partial/` beside its final place and moved to `<out>` only once complete, so
every way out leaves either the old run intact or the new one complete:

- an error, Ctrl-C or SIGTERM (the CLI turns it into an exception) abandons the staging folder, which this
  process made, and leaves `<out>` as it was;
- `kill -9` leaves a `<out>.partial` that the next run into `<out>` recognises (its marker, its dead lock)
  and removes before starting, saying so;
- with `overwrite`, the new run and the old one are swapped in one atomic rename (`renameat2` with
  RENAME_EXCHANGE on Linux; two renames elsewhere) and only then is the old run deleted, file by file,
  from the list of files deepscope wrote into it.

What may be replaced: only a folder that deepscope made (it holds the marker `.deepscope-run.json`, which
lists every file written) and that holds nothing else. An empty folder may be used as `<out>`. A file, a
symbolic link, a folder of anyone else's files, the current folder or one of its parents is refused
with a message, with or without `overwrite`. A lock (`flock` on `<out>.partial/.lock`) stops a second
process from writing into the same run.

`config.json` has one schema for every kind of run (`write_config`, `read_config`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import json
import math
import os
import platform
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from .errors import DataError, OutputError, raise_pending_interrupt

# File names of a run folder: every writer and reader uses these constants.
MARKER = ".deepscope-run.json"  # made by deepscope: kind, state, and (once complete) the files it wrote
LOCK = ".lock"  # inside the staging folder; flock'ed while a process writes the run
CONFIG = "config.json"
METRICS = "metrics.json"
RECORDER = "recorder.json"
FINDINGS = "findings.json"
CHECKS = "checks.json"  # what the diagnosis checked (diagnose.Analysis.to_dict() and its summary line)
STATS = "stats.npz"
WEIGHTS = "model.safetensors"
REPORT = "report.html"
LR_FIND = "lr_find.json"
LR_FIND_PNG = "lr_find.png"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"  # folder of checkpoints (deepscope.checkpoint): step-<N>.safetensors, best.safetensors
EXPORT = "export"  # folder of deployable models (deepscope.export): model.torchscript.pt, model.pt2, model.onnx
PROFILE_TRACE = "profile_trace.json"  # torch.profiler's Chrome/Perfetto trace of `--profile N` steps
PROFILE_OPS = "profile_ops.json"  # the top operators of that trace, for the report
ABLATION_CSV, ABLATION_MD, ABLATION_PNG = "ablation.csv", "ablation.md", "ablation.png"
STAGING_SUFFIX = ".partial"
# What deepscope writes into a run while it is unfinished (an unfinished run has no list of its files yet):
# the names above, their temporary files, TensorBoard's event files and the saved NaN batch. Only these are
# removed from a staging folder; anything else in it stops the removal.
OWN_PATTERNS = ("*.json", "*.json.tmp", "*.npz", "*.npz.tmp", "*.safetensors", "*.html", "*.html.tmp", "*.png",
                "*.csv", "*.md", "nonfinite_batch.pt", f"{TENSORBOARD}/*", f"{TENSORBOARD}/**/*",
                f"{CHECKPOINTS}/*.safetensors", f"{CHECKPOINTS}/*.sha256", f"{CHECKPOINTS}/*.tmp", ".lock",
                f"{EXPORT}/*")
OWN_FOLDERS = (TENSORBOARD, CHECKPOINTS, EXPORT)  # subfolders deepscope writes into
CONFIG_FORMAT = 1  # version of the config.json schema below
KINDS = ("train", "doctor", "lr-find", "ablate")


def default_run_dir(prefix: str = "train", root: str | Path = "runs") -> Path:
    return Path(root) / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when a run (or an unfinished one) already has that name."""
    candidate, n = path, 1
    while candidate.exists() or candidate.with_name(candidate.name + STAGING_SUFFIX).exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _say(message: str) -> None:
    print(f"deepscope: {message}", file=sys.stderr)


# --- reading a marker ---------------------------------------------------------------------------------
def read_marker(folder: Path) -> dict | None:
    """The marker of a folder deepscope made, or None when there is none (or it is not ours)."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "deepscope" or not isinstance(data.get("files", []), list):
        return None
    return data


def is_run_folder(folder: str | Path) -> bool:
    """Whether `folder` is a complete run written by deepscope."""
    marker = read_marker(Path(folder))
    return marker is not None and marker.get("state") == "complete"


def _files_under(folder: Path) -> list[str]:
    """Every file below `folder`, as sorted POSIX paths relative to it (links count as files)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            out.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(out)


def foreign_files(folder: Path) -> list[str]:
    """Files in a deepscope run folder that deepscope did not write (not in its marker's list)."""
    marker = read_marker(folder) or {}
    ours = set(marker.get("files", [])) | {MARKER, LOCK}
    return [f for f in _files_under(folder) if f not in ours]


# --- the atomic swap -------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a))


def _is_own(rel: str) -> bool:
    """Whether a file of an unfinished run (relative path) is one deepscope writes (OWN_PATTERNS)."""
    path = PurePosixPath(rel)
    return any(path.match(p) for p in OWN_PATTERNS) and (len(path.parts) == 1 or path.parts[0] in OWN_FOLDERS)


def remove_unfinished(folder: Path) -> list[str]:
    """Remove an unfinished run's files that deepscope writes, then its emptied folders; returns the files
    left (someone else's), in which case the folder stays."""
    return _remove_listed(folder, [f for f in _files_under(folder) if _is_own(f)])


def _remove_listed(folder: Path, files: list[str]) -> list[str]:
    """Delete `files` (relative paths) from `folder`, then its emptied subfolders and the folder itself.
    Returns what is left (files that were not in the list), so nothing unlisted is ever removed."""
    for rel in files + [MARKER, LOCK]:
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            continue  # a marker is data: never follow it out of the folder
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            try:
                (Path(root) / d).rmdir()
            except OSError:
                pass  # not empty: holds something deepscope did not write
    left = _files_under(folder)
    if not left:
        folder.rmdir()
    return left


# --- the run folder ----------------------------------------------------------------------------------------
class RunFolder:
    """One run's folder. Use `RunFolder.prepare(out, kind)` as a context manager:

        with RunFolder.prepare(out, "train", overwrite=False) as run:
            ...write into run.path (the staging folder)...
            run.finish()         # moves it to run.final; an exception before this abandons it

    Raises OutputError (before any work) when `out` is not a folder deepscope may write, holds a run and
    `overwrite` is False, or another process is writing the same run.
    """

    def __init__(self, final: Path, kind: str, overwrite: bool, log: Callable[[str], None]):
        self.final, self.kind, self.overwrite, self.log = final, kind, overwrite, log
        self.path = final.with_name(final.name + STAGING_SUFFIX)  # where files are written until finish
        self.finished = False
        self.outcome = ""  # one sentence on what happened to the folder, for the user
        self._lock_fd: int | None = None
        self._made_parents: list[Path] = []
        self._started = datetime.datetime.now().isoformat(timespec="seconds")
        self.failed_optional: list[str] = []  # optional steps (report, ...) that failed; the run was kept
        self.kept = False  # an unfinished run left in place to be resumed (keep_unfinished)

    # --- prepare -----------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, out: str | Path | None, kind: str, *, overwrite: bool = False,
                log: Callable[[str], None] = _say) -> "RunFolder":
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}; kinds are {KINDS}")
        final = check_out(out if out is not None else _unused(default_run_dir(kind)), overwrite)
        run = cls(final, kind, overwrite, log)
        run._make_staging()
        return run

    def _make_staging(self) -> None:
        parent = self.final.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        tmp = parent / f".{self.final.name}.starting-{os.getpid()}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._made_parents = missing
            self._clear_stale_staging()
            tmp.mkdir()
            self._lock_fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write_marker(tmp, state="writing")
        except BaseException as e:  # also Ctrl-C here: nothing of this process may stay behind
            if tmp.is_dir():
                remove_unfinished(tmp)
            self._release()
            self._remove_made_parents()
            if not isinstance(e, OSError):
                raise
            in_the_way = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
            why = f"{in_the_way} is a file, not a folder" if in_the_way else (e.strerror or str(e))
            raise OutputError(f"cannot write the output folder {self.final} ({why}); choose a writable --out") from None
        try:
            os.rename(tmp, self.path)  # atomic: a staging folder always has its lock and marker
        except OSError as e:
            remove_unfinished(tmp)
            self._release()
            self._remove_made_parents()
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"{self.path} appeared while preparing it; is another deepscope writing "
                                  f"{self.final}? Try again, or choose another --out") from None
            raise OutputError(f"cannot write the output folder {self.final} ({e.strerror or e}); "
                              f"choose a writable --out") from None

    @classmethod
    def reopen(cls, run_dir: str | Path, kind: str = "train", log: Callable[[str], None] = _say) -> "RunFolder":
        """Continue writing an unfinished run (`<out>.partial`, left by an interruption or a killed process):
        `run_dir` names it with or without the suffix. Its lock is taken; on `finish` it moves to `<out>`
        as any run does. OutputError when there is no such unfinished run, it is of another kind, it is
        complete already, or another process is writing it."""
        given = Path(os.path.abspath(Path(run_dir).expanduser()))
        final = given.with_name(given.name[:-len(STAGING_SUFFIX)]) if given.name.endswith(STAGING_SUFFIX) else given
        staging = final.with_name(final.name + STAGING_SUFFIX)
        if not staging.is_dir() or staging.is_symlink():
            if is_run_folder(final):
                raise OutputError(f"{final} is a complete run: all its epochs ran, there is nothing to resume "
                                  f"(start a new run, or export or compare this one)")
            if given.is_file():
                raise OutputError(f"{run_dir} is a file; --resume takes the folder of the interrupted run (its --out, "
                                  f"with or without .partial) and continues from that run's latest checkpoint. To "
                                  f"start from one checkpoint file, use Python: learn.fit(n, resume_from=FILE)")
            raise OutputError(f"there is no unfinished run at {run_dir} (no {staging.name} folder); --resume takes "
                              f"the --out of a run that was interrupted or killed")
        marker = read_marker(staging)
        if marker is None:
            raise OutputError(f"{staging} was not made by deepscope; it cannot be resumed")
        if marker.get("kind") != kind:
            raise OutputError(f"{staging} is a `{marker.get('kind')}` run; only `deepscope {kind}` runs resume here")
        run = cls(final, kind, False, log)
        fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another deepscope process (pid {marker.get('pid', '?')}) is writing {final}; wait "
                              f"for it to finish") from None
        run._lock_fd = fd
        run._started = marker.get("started", run._started)
        run._write_marker(staging, state="writing")
        # it existed before this process: whatever stops this one, it is kept, with its checkpoints
        run.kept = True
        run.outcome = f"the unfinished run is kept in {staging}; resume it with: {resume_command(final)}"
        return run

    def discard(self, name: str) -> None:
        """Remove a file (or a folder of files) this unfinished run wrote earlier and that no longer
        describes it: the report of what ran before an interruption, or a model exported from it, once the
        run resumes."""
        if self.finished:
            return
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            _remove_listed(target, [f for f in _files_under(target) if _is_own(f"{name}/{f}")])
        elif _is_own(name):
            target.unlink(missing_ok=True)

    def keep_unfinished(self, outcome: str) -> None:
        """Leave the unfinished run where it is (its checkpoints let it resume) instead of abandoning it
        when the process stops; `outcome` tells the user what happened and how to go on."""
        self.kept = True
        self._write_marker(self.path, state="interrupted")
        self.outcome = outcome

    def _clear_stale_staging(self) -> None:
        """A `<out>.partial` left by a process that died (kill -9, power loss) is removed, saying so; one
        whose lock is held belongs to a running process and stops this one."""
        staging = self.path
        if not staging.exists() and not staging.is_symlink():
            return
        marker = read_marker(staging) if staging.is_dir() and not staging.is_symlink() else None
        if marker is None:
            raise OutputError(f"{staging} exists and was not made by deepscope; deepscope never deletes it: "
                              f"move it away or choose another --out")
        fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another deepscope process (pid {marker.get('pid', '?')}, started "
                              f"{marker.get('started', '?')}) is writing {self.final}; wait for it to finish "
                              f"or choose another --out") from None
        if has_checkpoints(staging) and not self.overwrite:
            os.close(fd)
            raise OutputError(f"{staging} holds an interrupted {marker.get('kind', 'train')} run with checkpoints; "
                              f"continue it with `deepscope {marker.get('kind', 'train')} --resume {self.final}`, or "
                              f"pass --overwrite to discard it and start again")
        try:
            left = remove_unfinished(staging)
        finally:
            os.close(fd)
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            raise OutputError(f"{staging}, left by an interrupted run, also holds files deepscope did not write "
                              f"({shown}); deepscope removed only its own: move those away, or choose another --out")
        self.log(f"removed {staging}, left by an interrupted run (pid {marker.get('pid', '?')}, started "
                 f"{marker.get('started', '?')})")

    def _write_marker(self, folder: Path, state: str, files: list[str] | None = None) -> None:
        from . import __version__

        data = {"tool": "deepscope", "version": __version__, "kind": self.kind, "state": state,
                "pid": os.getpid(), "started": self._started}
        if files is not None:
            data["files"] = files
        write_text(folder / MARKER, json.dumps(data, indent=2) + "\n")

    # --- write ---------------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """Where a file of the run is written now (inside the staging folder until `finish`)."""
        return (self.final if self.finished else self.path) / name

    def write_json(self, name: str, data) -> Path:
        path = self.file(name)
        write_json(path, data)
        return path

    def write_config(self, config: dict, *, environment: dict, data: dict | None = None,
                     options: dict | None = None, wall_seconds: float | None = None) -> Path:
        """config.json, the same schema for every kind of run (see `read_config`)."""
        return self.write_json(CONFIG, {"format": CONFIG_FORMAT, "kind": self.kind, "config": config,
                                        "options": options or {}, "data": data or {},
                                        "environment": environment, "wall_seconds": wall_seconds,
                                        "command": _command_line()})

    def optional(self, what: str, step: Callable[[], object]) -> bool:
        """Run a step whose failure must not cost the run (the report, TensorBoard): on an error, say so
        and go on. Ctrl-C and SIGTERM still stop the run."""
        try:
            step()
            return True
        except Exception as e:  # noqa: BLE001 - any failure of an optional step is reported, not raised
            self.log(f"warning: could not write the {what} ({type(e).__name__}: {e}); the run is kept without it")
            self.failed_optional.append(what)
            return False

    # --- finish or abandon ---------------------------------------------------------------------------------
    def finish(self) -> Path:
        """Move the complete run to its final place (swapping out an old run there when allowed). A stop
        asked for earlier (Ctrl-C, SIGTERM) that Python swallowed where it arrived (in a finaliser) is
        raised here instead, so the old run is not replaced after the user asked to stop."""
        raise_pending_interrupt()
        files = [f for f in _files_under(self.path) if f not in (MARKER, LOCK)]
        self._write_marker(self.path, state="complete", files=files)
        fsync_dir(self.path)
        old = self.final.exists() and not _is_empty_dir(self.final)
        if old:
            # Checked again now: the old run may have changed while this one trained. The new run is never
            # lost for it: it goes beside the old one.
            try:
                check_out(self.final, self.overwrite)
            except OutputError as e:
                self.final = _unused(self.final.with_name(self.final.name + "-new"))
                self.log(f"{e}; the new run is kept in {self.final} instead")
                return self.finish()
            if _exchange(self.path, self.final):
                leftover = self.path  # the old run, now under the staging name
            else:
                leftover = self.final.with_name(f".{self.final.name}.replaced-{os.getpid()}")
                os.rename(self.final, leftover)
                os.rename(self.path, self.final)
            self.finished = True
            marker = read_marker(leftover) or {}
            left = _remove_listed(leftover, list(marker.get("files", [])))
            if left:
                kept = self.final.with_name(f"{self.final.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(leftover, kept)
                self.log(f"the old run held files deepscope did not write ({', '.join(left[:5])}); they are "
                         f"kept in {kept}")
            self.outcome = f"replaced the old run in {self.final}"
        else:
            if self.final.exists():
                self.final.rmdir()  # empty: nothing to lose (a race adding files makes this fail safely)
            os.rename(self.path, self.final)
            self.finished = True
            self.outcome = f"wrote {self.final}"
        fsync_dir(self.final.parent)
        return self.final

    def abandon(self) -> None:
        """Remove the unfinished staging folder (this process made it); `<out>` is left as it was."""
        if self.finished:
            return
        try:
            left = remove_unfinished(self.path)
        except OSError:
            left = ["(could not be read)"]
        self._remove_made_parents()
        if self.final.exists() and not _is_empty_dir(self.final):
            self.outcome = f"stopped before the run was complete; the old run in {self.final} is intact"
        else:
            self.outcome = f"stopped before the run was complete; nothing was written to {self.final}"
        if left:
            self.outcome += f" ({self.path} is kept: it holds files deepscope did not write: {', '.join(left[:5])})"

    def _remove_made_parents(self) -> None:
        for p in self._made_parents:  # innermost first; only folders this process created and left empty
            try:
                p.rmdir()
            except OSError:
                break

    def _release(self) -> None:
        if self._lock_fd is not None:
            if self.finished:
                try:
                    (self.final / LOCK).unlink()
                except FileNotFoundError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not self.finished:
                if not self.kept:
                    self.abandon()
                if isinstance(exc, BaseException):
                    _attach_outcome(exc, self.outcome)
        finally:
            self._release()


class FollowerRun:
    """The run folder as a rank other than 0 of a DistributedDataParallel job sees it: rank 0's paths (to
    read checkpoints from), and every write a no-op, since only rank 0 writes (deepscope.distributed)."""

    def __init__(self, path: Path, final: Path):
        self.path, self.final, self.finished, self.kept = Path(path), Path(final), False, False
        self.failed_optional: list[str] = []
        self.outcome = ""

    def log(self, message: str) -> None:
        pass

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data) -> None:
        pass

    def write_config(self, *args, **kwargs) -> None:
        pass

    def optional(self, what: str, step) -> bool:
        return True

    def discard(self, name: str) -> None:
        pass

    def keep_unfinished(self, outcome: str) -> None:
        self.kept, self.outcome = True, outcome

    def finish(self) -> Path:
        self.finished = True
        return self.final

    def _release(self) -> None:
        pass

    def __enter__(self) -> "FollowerRun":
        return self

    def __exit__(self, *exc) -> None:
        pass


def shared_run(open_run: Callable[[], tuple]) -> tuple:
    """The run folder of a job of one process or of several (torchrun, deepscope.distributed), and a value
    its opener computed. `open_run()` prepares (or reopens) the folder and returns (RunFolder, value), the
    value picklable (e.g. the config as a dict). In a single process it is simply called. Under torchrun
    (the process group is joined here) rank 0 alone calls it, and every other rank gets a FollowerRun of the
    same paths, which writes nothing, and rank 0's value. An error on rank 0 is raised on every rank, and
    printed by rank 0 alone (deepscope.cli)."""
    from . import distributed

    if not distributed.launched():
        return open_run()
    distributed.init()
    shared, run, value, error = None, None, None, None
    if distributed.is_main():
        try:
            run, value = open_run()
            shared = (str(run.path), str(run.final), value)
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
            error = e
    try:
        shared, message = distributed.broadcast_object((shared, f"{type(error).__name__}: {error}" if error else None))
    except BaseException as e:  # a stop signal (or a rank gone) before the run began: rank 0 lets the folder go
        if run is not None:
            run.__exit__(type(e), e, e.__traceback__)
        raise
    if error is not None:
        raise error
    if message is not None:
        error = OutputError(f"rank 0 could not start the run ({message})")
        error.told_by_rank0 = True
        raise error
    path, final, value = shared
    return (run if run is not None else FollowerRun(Path(path), Path(final))), value


def _attach_outcome(exc: BaseException, outcome: str) -> None:
    """Let the CLI say what happened to the run folder when it reports the error."""
    exc.run_folder_outcome = outcome  # read by deepscope.cli.main


def has_checkpoints(folder: str | Path) -> bool:
    """Whether a run folder holds a checkpoint to resume from."""
    from .checkpoint import step_checkpoints

    return bool(step_checkpoints(Path(folder) / CHECKPOINTS))


def record_file(run_dir: str | Path, name: str) -> None:
    """Add a file written later into a finished run (a rebuilt report) to its marker's list, so that
    `--overwrite` knows deepscope wrote it. A folder without a marker is left alone."""
    run_dir = Path(run_dir)
    marker = read_marker(run_dir)
    if marker is None or marker.get("state") != "complete" or name in marker["files"]:
        return
    marker["files"] = sorted([*marker["files"], name])
    write_text(run_dir / MARKER, json.dumps(marker, indent=2) + "\n")


# --- checks on `out` -------------------------------------------------------------------------------------
def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def check_out(out: str | Path, overwrite: bool) -> Path:
    """`out` made absolute, or OutputError when deepscope may not write a run there (see the module doc)."""
    raw = Path(out).expanduser()
    if raw.is_symlink():
        raise OutputError(f"--out {out} is a symbolic link; pass the folder itself (deepscope does not write "
                          f"through links)")
    final = Path(os.path.abspath(raw))  # `..` resolved by the name, without following links
    if final.name in ("", ".", "..") or final.parent == final:
        raise OutputError(f"--out {out} is the root of the filesystem; choose a folder for the run")
    if final.name.endswith(STAGING_SUFFIX):
        raise OutputError(f"--out {out} ends in {STAGING_SUFFIX}, which deepscope uses for unfinished runs; "
                          f"choose another name")
    cwd = Path(os.path.abspath(os.getcwd()))
    if final == cwd or final in cwd.parents:
        raise OutputError(f"--out {out} is {'the current folder' if final == cwd else 'a parent of the current folder'} "
                          f"({final}); a run needs a folder of its own, e.g. --out runs/my-run")
    if not final.exists():
        return final
    if not final.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; deepscope never replaces it: choose another --out")
    if _is_empty_dir(final):
        return final
    marker = read_marker(final)
    if marker is None:
        why = ("it was written by an older deepscope, without the marker that lets deepscope recognise its own "
               "files" if (final / CONFIG).is_file() else "it holds files that deepscope did not write")
        raise OutputError(f"--out {out} is not empty and {why}; deepscope only replaces run folders it made "
                          f"itself: choose another --out, or move the folder away yourself")
    if not overwrite:
        raise OutputError(f"--out {out} already holds a deepscope run; pass --overwrite to replace it, or "
                          f"choose another --out")
    foreign = foreign_files(final)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"--out {out} holds a deepscope run plus files deepscope did not write ({shown}); "
                          f"--overwrite only removes deepscope's own files: move those away first")
    return final


# --- files ----------------------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems refuse to sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # a failed write() does not name its file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _finite_or_none(value):
    """JSON has no NaN or Infinity: write them as null (readers treat null as 'not measured')."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, data) -> None:
    """Strict JSON (non-finite floats become null), written atomically."""
    write_text(Path(path), json.dumps(_finite_or_none(data), indent=2, default=str, allow_nan=False) + "\n")


def read_json(path: str | Path, expect: type | tuple[type, ...] | None = None):
    """A JSON file of a run; DataError naming the file when it is unreadable, malformed or of the wrong type."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{path} is not valid JSON ({e}); re-create the run, or restore the file") from None
    if expect is not None and not isinstance(data, expect):
        names = " or ".join(_json_name(t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise DataError(f"{path} should hold a JSON {names}; it holds a JSON {_json_name(type(data).__name__)}")
    return data


def _json_name(py: str) -> str:
    return {"dict": "object", "list": "list", "str": "string", "float": "number", "int": "number",
            "NoneType": "null", "bool": "boolean"}.get(py, py)


def unfinished_config(run_dir: str | Path) -> dict | None:
    """config.json of the run `run_dir` names (with or without .partial), read from its unfinished folder
    first, then from the finished one; None when neither can be read."""
    given = Path(run_dir)
    final = given.with_name(given.name[:-len(STAGING_SUFFIX)]) if given.name.endswith(STAGING_SUFFIX) else given
    for folder in (final.with_name(final.name + STAGING_SUFFIX), final):
        try:
            return read_config(folder)
        except Exception:  # noqa: BLE001 - missing or unreadable there
            continue
    return None


def resume_command(final: Path) -> str:
    """The command that continues the run `final`: with the number of processes it trained with (its
    config.json's environment; this job's when not recorded), under torchrun when more than one."""
    from . import distributed

    config = unfinished_config(final)
    processes = distributed.world_size()
    try:
        processes = int(config["environment"].get("processes", processes)) if config else processes
    except (TypeError, ValueError):
        pass
    if processes > 1:
        return f"torchrun --nproc-per-node {processes} -m deepscope train --resume {final}"
    return f"deepscope train --resume {final}"


def read_config(run_dir: str | Path) -> dict:
    """config.json of a run in the one schema: `kind`, `config` (the command's settings), `options`,
    `data`, `environment` (dicts) and `wall_seconds` (number or null). Runs of older versions, whose
    config.json lacked some of these, are read with the missing parts empty. DataError when it is not a
    run's config."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DataError(f"{run_dir} is not a deepscope run folder (no {CONFIG}); pass a folder that "
                        f"`deepscope train` (or doctor, lr-find, ablate) wrote")
    cfg = read_json(path, dict)
    for key in ("config", "options", "data", "environment"):
        if not isinstance(cfg.setdefault(key, {}), dict):
            raise DataError(f"{path}: {key!r} should be a JSON object; it is a JSON {_json_name(type(cfg[key]).__name__)}")
    seconds = cfg.setdefault("wall_seconds", None)
    if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)):
        raise DataError(f"{path}: 'wall_seconds' should be a number, not {seconds!r}")
    cfg.setdefault("kind", "train")
    return cfg


def _command_line() -> list[str]:
    return ["deepscope", *sys.argv[1:]] if Path(sys.argv[0]).name in ("deepscope", "__main__.py") else list(sys.argv)


def environment(device: torch.device | str) -> dict:
    """What produced a result: versions, device, threads, processes."""
    import numpy

    from . import __version__, distributed

    env = {"deepscope": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
           "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "processes": distributed.planned_world_size()}  # torchrun's processes training together (1 alone)
    if torch.cuda.is_available() and str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env
