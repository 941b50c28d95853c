"""`deepscope compare RUN_A RUN_B [RUN_C ...]`: one self-contained HTML page comparing run folders."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="compare two or more run folders side by side in one HTML page",
        description="Write one self-contained HTML page (no network needed, plots inlined) comparing run folders: "
                    "a summary table (final metrics, wall time, findings and their root causes), the settings that "
                    "differ, the loss and accuracy curves overlaid, per-layer activation std and off fraction side "
                    "by side, and each run's findings. The run folders are only read.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `deepscope train` (at least two; "
                                                             "`deepscope runs` lists them)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="the page to write (default: compare.html in the current folder; a folder gets a compare.html "
                        "inside it). Never inside a run folder; an existing file is replaced only when it is a "
                        "comparison page deepscope wrote")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compare import write_compare

    path = write_compare(args.runs, args.out)
    print(f"wrote {path} (comparing {len(args.runs)} runs)")
    return 0
