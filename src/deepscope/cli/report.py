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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import write_report
    from ..runfolder import REPORT, record_file

    path = write_report(args.run_dir)
    record_file(args.run_dir, REPORT)
    print(f"wrote {path}")
    return 0
