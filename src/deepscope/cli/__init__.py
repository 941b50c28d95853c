"""The `deepscope` command. Each sub-command lives in its own module exposing `add_parser(subparsers)`,
which registers the sub-command and sets `func(args) -> int` as its handler."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..cpu_memory import keep_freed_memory
from ..errors import DeepscopeError

# Module names under deepscope.cli, in the order `deepscope --help` lists them.
SUBCOMMANDS = ("train", "report", "doctor", "lr_find", "ablate", "bench")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # a deepscope process trains: stop the per-step page faults (cpu_memory.py)
    try:
        return int(args.func(args) or 0)
    except DeepscopeError as e:
        print(f"deepscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
