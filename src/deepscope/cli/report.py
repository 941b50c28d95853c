"""`deepscope report RUN_DIR`: rebuild report.html from a run folder's saved files (no retraining)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="rebuild report.html of a run folder from its saved files",
        description="Rebuild RUN_DIR/report.html from the files `deepscope train` saved there (config, metrics, "
                    "statistics, findings). Nothing is retrained.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `deepscope train`")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report.html that deepscope cannot tell it wrote (a folder without its marker, "
                        "e.g. from an older deepscope); a run folder deepscope made needs no flag")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import OutputError
    from ..report import write_report
    from ..runfolder import REPORT, read_marker, record_file

    existing = Path(args.run_dir) / REPORT
    if existing.exists() and read_marker(Path(args.run_dir)) is None and not args.overwrite:
        raise OutputError(f"{existing} exists and this folder has no deepscope marker, so deepscope cannot tell "
                          f"that it wrote that file; pass --overwrite to replace it, or move it away")
    path = write_report(args.run_dir)
    record_file(args.run_dir, REPORT)
    print(f"wrote {path}")
    return 0
