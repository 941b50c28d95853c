"""What watching every layer costs: per-step time of training with no hooks, with deepscope's
ActivationStats, and with a reference hook that reads each statistic back with `.item()` per layer per
step, the way fastai's ActivationStats does (mean, std, and histc(40, 0, 10) moved to the CPU).

The variants run interleaved (a, b, c, b', a, b, c, b', ...; b' is b with `subsample=4096`) in one process so drifts in machine load
hit all three alike; the median step time of each is reported. Then the statistics store is fed 100k
synthetic rows to show its memory stays flat.

    .venv/bin/python benchmarks/stats_overhead.py [--steps 20] [--rounds 5] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from torch import nn

from deepscope.callback import Callback
from deepscope.callbacks import DeviceCallback
from deepscope.data import DataLoaders
from deepscope.hooks import Hooks, select_modules
from deepscope.learner import Learner
from deepscope.models import cnn
from deepscope.stats import ActivationStats, HistoryStore
from deepscope.stats.callback import MERGE, STD_OF


class StepTimer(Callback):
    """Wall time of each training batch (synchronised on CUDA so queued work is counted)."""

    order = 100

    def __init__(self):
        self.times: list[float] = []

    def _sync(self, learn) -> None:
        if learn.xb.is_cuda:
            torch.cuda.synchronize()

    def before_batch(self, learn) -> None:
        self._sync(learn)
        self._start = time.perf_counter()

    def after_batch(self, learn) -> None:
        self._sync(learn)
        self.times.append(time.perf_counter() - self._start)


class ItemStats(Callback):
    """The reference: per layer per step, mean and std via .item() and a histogram copied to the CPU."""

    def before_fit(self, learn) -> None:
        self.records: list[list] = []
        self.hooks = Hooks(select_modules(learn.model), self._record)

    def _record(self, hook, module, inputs, output) -> None:
        if not module.training:
            return
        x = output.detach().float()
        self.records.append([x.mean().item(), x.std().item(), x.abs().histc(40, 0, 10).cpu()])

    def cleanup_fit(self, learn) -> None:
        self.hooks.remove()


def one_run(model: nn.Module, batches: list, extra: list, device: torch.device) -> list[float]:
    timer = StepTimer()
    dls = DataLoaders(train=batches, valid=None)
    learn = Learner(model, dls, cbs=[DeviceCallback(device, channels_last=True), timer, *extra],
                    opt_func=torch.optim.AdamW)
    learn.fit(1)
    return timer.times[1:]  # the first step of each run warms caches and allocators


def store_memory(n_modules: int = 13, bins: int = 40, n_params: int = 9) -> dict[int, int]:
    """Bytes held by the store after 1k, 10k and 100k synthetic rows, fed 64 at a time as in training."""
    store = HistoryStore(MERGE, std_of=STD_OF)
    rng = np.random.default_rng(0)
    block = {k: rng.random((64, n_params if k in ("weight_norm", "param_grad_norm", "update_ratio") else n_modules)
                           + ((bins,) if k == "act_hist" else ())).astype(np.float32) for k in MERGE}
    sizes = {}
    for start in range(0, 100_000, 64):
        store.append(np.arange(start, start + 64), block)
        done = start + 64
        for mark in (1_024, 10_048, 100_032):
            if done == mark:
                sizes[mark] = store.nbytes
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (a, b, c)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# stats_overhead: {hw}, torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {args.threads}, device {device}")
    print(f"# model cnn(nfs=[16,32,64,128], norm='batch'), channels_last, AdamW, batch 256, "
          f"{args.steps} steps x {args.rounds} rounds, interleaved")
    torch.manual_seed(0)
    batches = [(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))) for _ in range(4)]
    batches = [batches[i % 4] for i in range(args.steps + 1)]
    variants = {"a_none": lambda: [], "b_deepscope": lambda: [ActivationStats()], "c_item": lambda: [ItemStats()],
                "b_sub4096": lambda: [ActivationStats(subsample=4096)]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, make in variants.items():
            torch.manual_seed(0)
            model = cnn(nfs=[16, 32, 64, 128], norm="batch")
            times[name] += one_run(model, batches, make(), device)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:12s} median {v * 1e3:8.2f} ms/step  (n={len(times[k])})")
    a, b, c = med["a_none"], med["b_deepscope"], med["c_item"]
    print(f"b/a = {b / a:.3f}   c/a = {c / a:.3f}   overhead ratio (c-a)/(b-a) = {(c - a) / max(b - a, 1e-9):.2f}")
    print(f"goals: b/a <= 1.10 {'met' if b / a <= 1.10 else 'MISSED'}; "
          f"overhead ratio >= 3 {'met' if (c - a) >= 3 * (b - a) else 'MISSED'}")
    bs = med["b_sub4096"]
    print(f"with subsample=4096 (activation statistics from 4096 random values per module): b/a = {bs / a:.3f}, "
          f"overhead ratio (c-a)/(b-a) = {(c - a) / max(bs - a, 1e-9):.2f}")
    sizes = store_memory()
    print("store bytes after " + ", ".join(f"{k:,} steps: {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
