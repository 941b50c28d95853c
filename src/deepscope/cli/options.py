"""Argument types shared by the sub-commands: a bad value stops argparse with a message naming the option
and the rule, before anything runs."""
from __future__ import annotations

import argparse
import math

# How a sub-command runs under `torchrun` with several processes: its parser's `ddp` default, read by
# deepscope.cli.main (the one place that applies it). A command that sets none is a single-process command:
# rank 0 runs it, the other processes exit 0 at once, doing and printing nothing.
EVERY_RANK = "every rank"  # DDP-aware (train, lr-find): every process runs it; rank 0 writes and prints
RANK0_WAITED = "rank 0, waited for"  # rank 0 alone runs it; the others wait for it and exit with its code

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: optimisers hold hyper-parameters as float32


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        kind = "a positive" if minimum == 1 else "0 or a positive"
        raise argparse.ArgumentTypeError(f"must be {kind} whole number, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.3g} (training runs in float32), got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or positive, got {value}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda, cuda:N, mps, ...: checked against this machine before any work starts."""
    from ..callbacks.device import default_device
    from ..errors import ConfigError

    try:
        default_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def thread_count(text: str) -> int:
    """A number of torch CPU threads: at least 1, at most the cores this process may use."""
    from ..config import _cpu_count

    value = positive_int(text)
    if value > _cpu_count():
        raise argparse.ArgumentTypeError(f"this process may use {_cpu_count()} CPU core(s); more threads than cores "
                                         f"only wait for each other, got {value}")
    return value
