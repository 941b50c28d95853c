"""The matrix product written six ways, from Python loops to `torch.matmul` (fast.ai lesson 8).

Each rung removes one layer of Python interpretation from the innermost work; the benchmark in
`bench.py` measures what each step buys. All take `a` of shape (n, k) and `b` of shape (k, m) and
return (n, m).
"""
from __future__ import annotations

from typing import Callable

import torch


def matmul_python_lists(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Three nested loops over plain Python lists: every multiply-add is interpreted bytecode."""
    n, k, m = len(a), len(b), len(b[0])
    out = [[0.0] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            total = 0.0
            for p in range(k):
                total += a[i][p] * b[p][j]
            out[i][j] = total
    return out


def matmul_loops(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three loops indexing tensors: slower than lists, since each `a[i, p]` builds a 0-d tensor."""
    n, k = a.shape
    m = b.shape[1]
    out = torch.zeros(n, m, dtype=a.dtype)
    for i in range(n):
        for j in range(m):
            for p in range(k):
                out[i, j] += a[i, p] * b[p, j]
    return out


def matmul_elementwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two loops; the inner dot product is one vectorised row-times-column."""
    n, m = a.shape[0], b.shape[1]
    out = torch.zeros(n, m, dtype=a.dtype)
    for i in range(n):
        for j in range(m):
            out[i, j] = (a[i, :] * b[:, j]).sum()  # (k,) * (k,) -> scalar
    return out


def matmul_broadcast(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One loop over rows of `a`; broadcasting a row against all of `b` gives a whole output row."""
    n, m = a.shape[0], b.shape[1]
    out = torch.zeros(n, m, dtype=a.dtype)
    for i in range(n):
        out[i] = (a[i, :, None] * b).sum(dim=0)  # (k, 1) * (k, m) -> (k, m) -> (m,)
    return out


def matmul_einsum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """No Python loop: the index notation names the summed axis `k`."""
    return torch.einsum("ik,kj->ij", a, b)  # (n, k) x (k, m) -> (n, m)


def matmul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The library call: a tuned BLAS kernel."""
    return torch.matmul(a, b)  # (n, k) @ (k, m) -> (n, m)


def numba_matmul() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The three-loop product compiled by numba, or None when numba is not installed.

    Built on call (not at import) so that importing deepscope never triggers a JIT compile.
    """
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=False)
    def _loops(a, b, out):  # numpy arrays, compiled to machine code
        n, k = a.shape
        m = b.shape[1]
        for i in range(n):
            for j in range(m):
                total = 0.0
                for p in range(k):
                    total += a[i, p] * b[p, j]
                out[i, j] = total
        return out

    def matmul_numba(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(a.shape[0], b.shape[1], dtype=a.dtype)
        _loops(a.numpy(), b.numpy(), out.numpy())  # writes into out's memory
        return out

    return matmul_numba


def matmul_ladder() -> dict[str, Callable]:
    """Every available version by name, slowest first; all take and return tensors."""
    ladder: dict[str, Callable] = {
        "python lists": lambda a, b: torch.tensor(matmul_python_lists(a.tolist(), b.tolist()), dtype=a.dtype),
        "tensor loops": matmul_loops,
        "row x column": matmul_elementwise,
        "broadcast": matmul_broadcast,
    }
    compiled = numba_matmul()
    if compiled is not None:
        ladder["numba"] = compiled
    ladder["einsum"] = matmul_einsum
    ladder["torch.matmul"] = matmul_torch
    return ladder
