"""One typed config per training run. CLI flags map onto its fields; the resolved config is saved with
every run so the result can be traced back to exactly what produced it."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from .errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: optimisers hold hyper-parameters as float32
# Values of each tensor summarised per step, at most: the sample buffer holds 2 x modules x 8 steps of them
# (~0.8 GB at this size for the default CNN's 13 modules); 0 (every value, exactly) needs no buffer.
MAX_STATS_SAMPLE = 1 << 20
# The optimizers `opt` may name: torch.optim's, or deepscope's hand-written ones with a ds_ prefix.
PRECISIONS = ("fp32", "bf16", "fp16")  # `precision`: float32, or mixed precision in bfloat16 / float16
OPTIMIZER_NAMES = ("adamw", "adam", "sgd", "rmsprop", "ds_sgd", "ds_momentum", "ds_rmsprop", "ds_adam", "ds_adamw")


@dataclass
class TrainConfig:
    # data
    dataset: str = "fashion_mnist"  # fashion_mnist | mnist
    data_dir: str | None = None  # folder holding the IDX files; None searches $DEEPSCOPE_DATA, cache, system
    verify: bool = True  # check the files' MD5 against the published sums
    # model
    model: str = "cnn"  # cnn | resnet
    nfs: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # channels per block
    act: str = "relu"  # relu | leaky_relu | gelu | silu | tanh | sigmoid | general_relu
    norm: str = "batch"  # none | batch | layer | instance | group | running_batch
    init: str = "default"  # default (torch's) | kaiming | lsuv
    # optimisation
    epochs: int = 5
    lr: float = 1e-2  # peak learning rate of the schedule
    schedule: str = "one_cycle"  # one_cycle | cosine | constant
    opt: str = "adamw"  # adamw | adam | sgd (momentum 0.9) | rmsprop | ds_<name> for deepscope.optim's
    weight_decay: float = 1e-2
    batch_size: int = 256  # training batch; validation uses twice this
    clip: float | None = None  # clip the global gradient norm to this (GradClip); None: no clipping
    precision: str = "fp32"  # fp32 | bf16 | fp16: mixed precision (MixedPrecision; fp16 uses loss scaling)
    early_stop: int | None = None  # stop after this many epochs without a lower validation loss (EarlyStopping)
    # run
    seed: int = 42
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:1 | mps
    threads: int | None = None  # CPU threads for torch; None keeps torch's default
    limit_batches: int | None = None  # stop each pass after this many batches (smoke runs)
    stats: bool = True  # collect per-layer statistics (activations, gradients, updates)
    replay: bool = True  # check each step for NaN/Inf (one read-back) and replay the first bad one to name its module
    stats_every: int = 1  # record them every N training steps
    stats_sample: int = 4096  # values of each tensor summarised per step; 0: all of them (exact, ~1.6x the CPU step)
    tensorboard: bool = False  # also write TensorBoard event files
    profile: int | None = None  # record this many training steps with torch.profiler (after 1 skipped and 1 warm-up step)
    checkpoint_every: int | None = None  # also checkpoint every N training steps (always at each epoch's end)
    keep_checkpoints: int = 2  # step checkpoints kept (the best epoch's is kept besides)
    report: bool = True  # write report.html at the end (`deepscope report RUN` writes it later)
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics over the whole global batch (SyncBatchNorm)
    compile: str | None = None  # torch.compile backend for the forward pass (inductor, aot_eager, ...); None: eager
    out: str | None = None  # run folder; None makes runs/train-YYYYmmdd-HHMMSS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _check(value, hints[f.name]):
                raise ConfigError(f"config field {f.name!r} must be {f.type}, got {value!r}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be positive, got {value}")
        for name in ("limit_batches", "threads", "stats_every", "checkpoint_every", "keep_checkpoints", "early_stop"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.clip is not None and not self.clip > 0:
            raise ConfigError(f"clip must be a positive gradient norm, got {self.clip}")
        if self.stats_sample < 0:
            raise ConfigError(f"stats sample must be a number of values, or 0 for all of them, got {self.stats_sample}")
        if self.profile is not None and self.profile <= 0:
            raise ConfigError(f"profile must be a positive number of training steps to record, got {self.profile}")
        from .norms import NORM_KINDS

        choices = {"schedule": ("one_cycle", "cosine", "constant"), "init": ("default", "kaiming", "lsuv"),
                   "norm": NORM_KINDS, "model": ("cnn", "resnet"), "dataset": ("fashion_mnist", "mnist"),
                   "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
                raise ConfigError(f"{f.name.replace('_', ' ')} must be a finite number no larger than "
                                  f"{FLOAT32_MAX:.3g} (float32), got {value}")
        if not -2**63 <= self.seed < 2**64:
            raise ConfigError(f"seed must be between -2**63 and 2**64 - 1 (what torch.manual_seed takes), got {self.seed}")
        if self.stats_sample > MAX_STATS_SAMPLE:
            raise ConfigError(f"stats sample must be at most {MAX_STATS_SAMPLE:,} values per tensor, got "
                              f"{self.stats_sample:,}; use 0 for exact statistics of every value")
        from .models import ACTIVATIONS

        if self.act not in (*ACTIVATIONS, "general_relu"):
            raise ConfigError(f"unknown activation {self.act!r}; choose one of {sorted([*ACTIVATIONS, 'general_relu'])}")
        if self.opt not in OPTIMIZER_NAMES:
            raise ConfigError(f"unknown optimizer {self.opt!r}; choose one of {list(OPTIMIZER_NAMES)}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not self.nfs:
            raise ConfigError("nfs needs at least one number of channels, e.g. [16, 32, 64, 128]")
        cores = _cpu_count()
        if self.threads is not None and self.threads > cores:
            raise ConfigError(f"threads must be at most {cores}, the CPU cores this process may use, got {self.threads} "
                              f"(more threads than cores only makes them wait for each other)")
        if self.compile is not None:
            from .callbacks.training import check_compile_backend

            check_compile_backend(self.compile)
        from .callbacks.device import check_device

        if self.device != "auto":
            check_device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _cpu_count() -> int:
    """CPU cores this process may run on (its affinity where the OS tells it, else all of them)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check(value, hint) -> bool:
    """A small runtime type check for the annotations used above."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_check(v, item) for v in value)
    return isinstance(value, hint)
