"""What watching every layer costs: per-step time of training with no hooks, with deepscope's
ActivationStats, and with a reference hook that reads each statistic back with `.item()` per layer per
step, the way fastai's ActivationStats does (mean, std, and histc(40, 0, 10) moved to the CPU).

The variants run interleaved in one process, in rounds (a, b, c, b'; then b, c, b', a; ...; b' is b with
`subsample=None`, exact statistics of every value), so drifts in machine load hit all of them alike. Each
ratio is taken within a round, from the median step time of each run, and the median over rounds is
reported: this CPU's speed drifts by tens of percent over minutes, far more than the overhead measured.
Then the statistics store is fed 100k synthetic rows to show its memory stays flat.

    .venv/bin/python benchmarks/stats_overhead.py [--steps 64] [--rounds 12] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

try:
    import resource                 # page-fault counts; Unix only
except ImportError:
    resource = None
from torch import nn

from deepscope.callback import Callback
from deepscope.callbacks import DeviceCallback
from deepscope.cpu_memory import keep_freed_memory
from deepscope.data import DataLoaders
from deepscope.hooks import Hooks, select_modules
from deepscope.learner import Learner
from deepscope.models import cnn
from deepscope.stats import ActivationStats, HistoryStore
from deepscope.stats.engine import MERGE, STD_OF


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


def one_run(model: nn.Module, batches: list, extra: list, device: torch.device) -> tuple[list[float], float]:
    """Step times of one epoch over `batches` (the first step left out: it warms caches and allocators),
    and the minor page faults per step."""
    timer = StepTimer()
    dls = DataLoaders(train=batches, valid=None)
    learn = Learner(model, dls, cbs=[DeviceCallback(device, channels_last=True), timer, *extra],
                    opt_func=torch.optim.AdamW)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
    learn.fit(1)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0) - faults
    return timer.times[1:], faults / len(batches)


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
    parser.add_argument("--steps", type=int, default=64, help="training steps per run (64: one statistics flush)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of (a, b, c, b')")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="leave glibc's malloc as it is, instead of keep_freed_memory() as `deepscope` does")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = False if args.glibc_default_malloc else keep_freed_memory()
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# stats_overhead: {hw}, torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {args.threads}, device {device}, keep_freed_memory {kept}")
    print(f"# model cnn(nfs=[16,32,64,128], norm='batch'), channels_last, AdamW, batch 256, "
          f"{args.steps} steps x {args.rounds} rounds, interleaved")
    torch.manual_seed(0)
    batches = [(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))) for _ in range(4)]
    batches = [batches[i % 4] for i in range(args.steps + 1)]
    variants = {"a_none": lambda: [], "b_deepscope": lambda: [ActivationStats()], "c_item": lambda: [ItemStats()],
                "b_exact": lambda: [ActivationStats(subsample=None)]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    faults: dict[str, list[float]] = {k: [] for k in variants}
    per_round: list[dict[str, float]] = []
    names = list(variants)
    for r in range(args.rounds):
        medians = {}
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            torch.manual_seed(0)
            model = cnn(nfs=[16, 32, 64, 128], norm="batch")
            run, run_faults = one_run(model, batches, variants[name](), device)
            times[name] += run
            faults[name].append(run_faults)
            medians[name] = statistics.fmean(run)  # the mean: periodic work (block summaries, flushes) counts
        per_round.append(medians)
    for k, v in times.items():
        print(f"{k:12s} median {statistics.median(v) * 1e3:8.2f} ms/step  (n={len(v)})  "
              f"minor page faults/step {statistics.median(faults[k]):6.0f}")

    def ratios(b_name: str) -> tuple[float, float]:
        """b/a and (c-a)/(b-a) from the medians over rounds of b/a and c/a (each ratio within a round)."""
        b_a = statistics.median(m[b_name] / m["a_none"] for m in per_round)
        c_a = statistics.median(m["c_item"] / m["a_none"] for m in per_round)
        return b_a, (c_a - 1) / (b_a - 1) if b_a > 1 else float("inf")

    b_rounds = sorted(m["b_deepscope"] / m["a_none"] for m in per_round)
    print("b/a per round: " + " ".join(f"{r:.3f}" for r in b_rounds))
    b_a, ref = ratios("b_deepscope")
    c_a = statistics.median(m["c_item"] / m["a_none"] for m in per_round)
    print(f"medians over rounds: b/a = {b_a:.3f}   c/a = {c_a:.3f}   overhead ratio (c-a)/(b-a) = {ref:.1f}")
    print(f"goals: b/a <= 1.10 {'met' if b_a <= 1.10 else 'MISSED'}; overhead ratio >= 3 {'met' if ref >= 3 else 'MISSED'}")
    e_a, e_ref = ratios("b_exact")
    print(f"exact statistics of every value (subsample=None): b/a = {e_a:.3f}, overhead ratio (c-a)/(b-a) = {e_ref:.2f}")
    sizes = store_memory()
    print("store bytes after " + ", ".join(f"{k:,} steps: {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
