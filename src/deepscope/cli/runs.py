"""`deepscope runs [DIR]`: list the run folders under DIR, oldest first."""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "runs", help="list the run folders under a folder (default: runs), oldest first",
        description="List the deepscope run folders in DIR (DIR itself, if it is one, and the folders directly in "
                    "it), oldest first: path, kind, date, final validation accuracy, and the errors and warnings "
                    "its diagnosis found. Unfinished runs (.partial folders) are shown as such.",
    )
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="where to look (default: %(default)s)")
    p.set_defaults(func=run)


def _date(marker: dict, folder: Path) -> str:
    """When the run started (its marker), else when its folder last changed."""
    started = marker.get("started")
    if isinstance(started, str):
        try:
            return datetime.datetime.fromisoformat(started).isoformat(sep=" ", timespec="seconds")
        except ValueError:
            pass
    try:
        return datetime.datetime.fromtimestamp(folder.stat().st_mtime).isoformat(sep=" ", timespec="seconds")
    except OSError:
        return "?"


def _accuracy(folder: Path) -> str:
    from ..errors import DataError
    from ..runfolder import METRICS, read_json

    if not (folder / METRICS).is_file():
        return "-"
    try:
        records = read_json(folder / METRICS, list)
    except DataError:
        return "?"
    for record in reversed(records):
        value = record.get("valid_accuracy") if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{100 * value:.2f}%"
    return "-"


def _problems(folder: Path) -> str:
    from ..errors import DataError
    from ..runfolder import FINDINGS, read_json

    if not (folder / FINDINGS).is_file():
        return "not diagnosed"
    try:
        findings = read_json(folder / FINDINGS, list)
    except DataError:
        return "findings unreadable"
    severities = [f.get("severity") for f in findings if isinstance(f, dict)]
    return f"{severities.count('error')} error(s), {severities.count('warning')} warning(s)"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_runs(root: Path) -> list[dict]:
    """Run folders (complete or unfinished) at `root` and one level below it, oldest first."""
    from ..checkpoint import step_checkpoints
    from ..runfolder import CHECKPOINTS, STAGING_SUFFIX, read_marker

    candidates = [root]
    try:
        candidates += sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        pass
    rows = []
    for folder in candidates:
        marker = read_marker(folder)
        if marker is None:
            continue
        complete = marker.get("state") == "complete"
        if complete:
            state = ""
        elif folder.name.endswith(STAGING_SUFFIX):
            pid = marker.get("pid")
            state = (f"unfinished (.partial: process {pid} is still running)" if _alive(pid) else
                     "unfinished (.partial, left by an interrupted run)")
            latest = step_checkpoints(folder / CHECKPOINTS)
            if latest and not _alive(pid):
                final = folder.with_name(folder.name[:-len(STAGING_SUFFIX)])
                from ..runfolder import resume_command

                state = (f"interrupted; checkpoint after {int(latest[-1].stem.split('-')[1])} steps: resume with "
                         f"`{resume_command(final)}`")
        else:
            state = f"unfinished (state {marker.get('state')!r})"
        rows.append({"path": str(folder), "kind": str(marker.get("kind", "?")), "date": _date(marker, folder),
                     "accuracy": _accuracy(folder) if complete else "-",
                     "problems": _problems(folder) if complete else state})
    return sorted(rows, key=lambda r: (r["date"], r["path"]))


def run(args: argparse.Namespace) -> int:
    from ..errors import DataError

    root = Path(args.dir)
    if not root.exists():
        raise DataError(f"{args.dir} does not exist; pass the folder that holds your runs (default: runs)")
    if not root.is_dir():
        raise DataError(f"{args.dir} is a file, not a folder; pass the folder that holds your runs")
    rows = find_runs(root)
    if not rows:
        print(f"no deepscope runs in {args.dir} (a run folder holds .deepscope-run.json; `deepscope train` "
              f"writes one under runs/ by default)")
        return 0
    header = {"path": "path", "kind": "kind", "date": "date", "accuracy": "valid acc", "problems": "findings"}
    widths = {k: max(len(r[k]) for r in [header, *rows]) for k in ("path", "kind", "date", "accuracy")}
    for r in [header, *rows]:
        print(f"{r['path']:<{widths['path']}}  {r['kind']:<{widths['kind']}}  {r['date']:<{widths['date']}}  "
              f"{r['accuracy']:>{widths['accuracy']}}  {r['problems']}")
    return 0
