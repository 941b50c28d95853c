"""Keep freed memory inside the process when training on a Linux CPU, instead of handing it back.

PyTorch's CPU tensors come from the C library's malloc. glibc gives big freed blocks back to the kernel
(munmap, or trimming the top of its heap), so a training step, which allocates and frees tens of MB of
activations and gradients, faults the same pages in again at every step. On the 2-core CI machine the
default CNN took 1,300 to 3,900 minor page faults per step with glibc's defaults and none with this
setting, and its step time dropped by a quarter or more (benchmarks/stats_overhead.py prints the fault
counts). The count also wanders with the heap's history, which made step times swing from run to run.

The price is that the process keeps its peak memory until it exits, which a training process holds at
every step anyway. The `deepscope` command applies it; call `keep_freed_memory()` yourself in a script
or notebook. It changes the whole process, so the library never applies it on its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LARGE = 1 << 30         # blocks up to 1 GiB come from the heap, and the heap is never trimmed


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve big blocks from its heap and never trim it. Returns True if it took
    effect, False where there is no glibc (macOS, Windows, musl) and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; older glibc caps the mmap threshold at 32 MiB, so fall back to that
    trimmed = mallopt(_M_TRIM_THRESHOLD, _LARGE) == 1
    mapped = mallopt(_M_MMAP_THRESHOLD, _LARGE) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return trimmed and mapped
