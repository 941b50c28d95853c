"""`deepscope bench matmul|conv`: time the hand-written foundations against PyTorch and print a table."""
from __future__ import annotations

import argparse

import torch

from ..errors import ConfigError
from .options import positive_float, positive_int

MATMUL_SIZES = ["5x784x10", "50x784x10"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time the foundations (matmul ladder, convolution) against PyTorch",
        description="Time hand-written implementations against PyTorch. Each candidate gets one untimed "
        "warm-up call; candidates are interleaved across repeats; the table shows medians and the "
        "speed-up over the slowest candidate of each case.")
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)

    matmul = kinds.add_parser(
        "matmul", help="the matmul ladder: Python loops -> broadcasting -> einsum -> torch.matmul",
        description="Time the same matrix product written six ways (seven with numba installed) on "
        "MNIST-shaped inputs: a batch of flattened 28x28 images times a 784x10 weight matrix.")
    _add_common(matmul)
    matmul.add_argument("--sizes", nargs="+", default=MATMUL_SIZES, metavar="NxKxM",
                        help="products to time, each as rows x inner x cols; default: " + " ".join(MATMUL_SIZES))
    matmul.set_defaults(func=run_matmul)

    conv = kinds.add_parser(
        "conv", help="2-D convolution: loops vs unfold+matmul (im2col) vs F.conv2d",
        description="Time a loop convolution on a small input, then unfold+matmul and F.conv2d on both "
        "the small and a realistic input. Shapes are BATCH C_IN C_OUT HEIGHT WIDTH.")
    _add_common(conv)
    conv.add_argument("--small", nargs=5, type=int, default=[1, 3, 8, 16, 16], metavar="D",
                      help="shape timed with all three versions; default: %(default)s")
    conv.add_argument("--large", nargs=5, type=int, default=[64, 16, 32, 28, 28], metavar="D",
                      help="shape timed without the loop version; default: %(default)s")
    conv.add_argument("--kernel", type=int, default=3, help="square kernel size; default: %(default)s")
    conv.set_defaults(func=run_conv)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed calls per candidate, after one warm-up; default: %(default)s")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch intra-op threads while timing; default: %(default)s")
    parser.add_argument("--budget", type=positive_float, default=3.0, metavar="SECONDS",
                        help="stop repeating a candidate once its timed calls took this long "
                        "(it keeps at least one); default: %(default)s")


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        n, k, m = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--sizes entries look like 5x784x10 (rows x inner x cols), got {text!r}") from None
    if min(n, k, m) <= 0:
        raise ConfigError(f"--sizes entries must be positive, got {text!r}")
    return n, k, m


def _header(args: argparse.Namespace) -> str:
    return f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats, medians"


def run_matmul(args: argparse.Namespace) -> int:
    from ..foundations.bench import bench_matmul, format_table

    sizes = [_parse_size(s) for s in args.sizes]
    rows = bench_matmul(sizes, repeats=args.repeats, threads=args.threads, budget_s=args.budget)
    print(_header(args))
    print(format_table(rows))
    return 0


def run_conv(args: argparse.Namespace) -> int:
    from ..foundations.bench import bench_conv, format_table

    if min(args.small + args.large) <= 0 or args.kernel <= 0:
        raise ConfigError("--small, --large and --kernel must all be positive")
    for shape in (args.small, args.large):
        if min(shape[3:]) + 2 * (args.kernel // 2) < args.kernel:
            raise ConfigError(f"a {args.kernel}x{args.kernel} kernel does not fit in shape {shape}")
    rows = bench_conv(tuple(args.small), tuple(args.large), args.kernel, repeats=args.repeats,
                      threads=args.threads, budget_s=args.budget)
    print(_header(args))
    print(format_table(rows))
    return 0
