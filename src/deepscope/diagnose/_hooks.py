"""Full backward hooks for tracing a NaN gradient, removed together, exactly once.

deepscope.hooks (Hook/Hooks) serves the forward hooks; its backward hooks are tensor hooks that see only
the gradient of a module's output, and finding the module that *turns* a finite gradient into NaN needs
its input gradient too, which only torch's full backward hook provides (on a one-off replay, since full
hooks refuse in-place ops downstream).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..hooks import opaque


class FullBackwardHooks:
    """`fn(module, grad_input, grad_output)` hooks removed together; a context manager, `remove()` idempotent."""

    def __init__(self) -> None:
        self._handles: list = []

    def add(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_full_backward_hook(opaque(fn)))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "FullBackwardHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One device sync for the whole list."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())
