"""Timing for the matmul ladder and the hand-written convolutions.

Good micro-benchmarks: the thread count is pinned (and restored afterwards), the first call of each
candidate is a warm-up and is not timed, candidates are interleaved repeat by repeat so a burst of
background load hits them all alike, and the median is reported, not the mean.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .conv import conv2d_loops, conv2d_unfold
from .matmul import matmul_ladder, matmul_python_lists


@dataclass
class BenchRow:
    case: str          # the input shapes, e.g. "5x784 @ 784x10"
    name: str          # which implementation
    seconds: float     # median time of one call
    runs: int          # how many timed calls the median is over
    speedup: float     # slowest median in this case / this median


def time_fn(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls to fn, after `warmup` untimed calls."""
    return time_interleaved({"fn": fn}, repeats, warmup)["fn"][0]


def time_interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     budget_s: float | None = None) -> dict[str, tuple[float, int]]:
    """Median seconds and number of timed runs for each candidate, timing them in turn each repeat.

    A candidate whose timed calls have used up `budget_s` is left out of later repeats (it keeps at least
    one timed call), so the slow pure-Python versions cannot make the benchmark take minutes.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if times[name] and budget_s is not None and sum(times[name]) >= budget_s:
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Run the body with `n` intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rows(case: str, timings: dict[str, tuple[float, int]]) -> list[BenchRow]:
    slowest = max(seconds for seconds, _ in timings.values())
    return [BenchRow(case, name, s, runs, slowest / s) for name, (s, runs) in timings.items()]


def bench_matmul(sizes: list[tuple[int, int, int]], repeats: int = 5, threads: int = 1,
                 budget_s: float = 3.0, seed: int = 0) -> list[BenchRow]:
    """Time every rung of the matmul ladder on (n, k) @ (k, m) inputs for each (n, k, m) in sizes."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    with pinned_threads(threads):
        for n, k, m in sizes:
            a, b = torch.randn(n, k, generator=g), torch.randn(k, m, generator=g)
            a_list, b_list = a.tolist(), b.tolist()  # converted once: time the loops, not the conversion
            candidates = {name: (lambda fn=fn: fn(a, b)) for name, fn in matmul_ladder().items()}
            candidates["python lists"] = lambda: matmul_python_lists(a_list, b_list)
            rows += _rows(f"{n}x{k} @ {k}x{m}", time_interleaved(candidates, repeats, budget_s=budget_s))
    return rows


def bench_conv(small: tuple[int, int, int, int, int] = (1, 3, 8, 16, 16),
               large: tuple[int, int, int, int, int] = (64, 16, 32, 28, 28), kernel: int = 3,
               repeats: int = 5, threads: int = 1, budget_s: float = 3.0, seed: int = 0) -> list[BenchRow]:
    """Loops, unfold+matmul and F.conv2d on `small`; unfold and F.conv2d only on `large`.

    Each shape is (batch, in_channels, out_channels, height, width); padding keeps the spatial size.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    with pinned_threads(threads):
        for shape, with_loops in ((small, True), (large, False)):
            n, c_in, c_out, h, w = shape
            x = torch.randn(n, c_in, h, w, generator=g)                   # (N, C_in, H, W)
            weight = torch.randn(c_out, c_in, kernel, kernel, generator=g)  # (C_out, C_in, k, k)
            bias = torch.randn(c_out, generator=g)
            pad = kernel // 2
            candidates = {}
            if with_loops:
                candidates["loops"] = lambda: conv2d_loops(x, weight, bias, padding=pad)
            candidates["unfold + matmul"] = lambda: conv2d_unfold(x, weight, bias, padding=pad)
            candidates["F.conv2d"] = lambda: F.conv2d(x, weight, bias, padding=pad)
            case = f"{n}x{c_in}x{h}x{w} -> {c_out}ch k{kernel}"
            rows += _rows(case, time_interleaved(candidates, repeats, budget_s=budget_s))
    return rows


def _format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table: case, implementation, median time, timed runs, speed-up over the slowest."""
    lines = ["| case | implementation | median | runs | speed-up vs slowest |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.name} | {_format_seconds(r.seconds)} | {r.runs} | {r.speedup:,.1f}x |")
    return "\n".join(lines)
