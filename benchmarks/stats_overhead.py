"""What watching every layer costs: per-step time of training with no statistics against training with
deepscope's statistics, through the Learner and through `deepscope.watch` in a plain PyTorch loop.

Learner arms, on the default CNN: a (no statistics), b (ActivationStats, 4096 sampled values per tensor),
c (a reference hook that reads each statistic back with `.item()` per layer per step, the way fastai's
ActivationStats does: mean, std, and histc(40, 0, 10) moved to the CPU) and b' (b with `subsample=None`,
exact statistics of every value). Plain-loop arms, each model trained by a hand-written loop without and
with `deepscope.watch(model, opt)` recording every step: the same CNN, a small Transformer encoder
classifier and an LSTM classifier (`PLAIN_MODELS`).

Everything runs interleaved in one process, in rounds (the Learner arms rotate their order every round,
each plain pair swaps its order), so drifts in machine load hit all arms alike. Each ratio is taken
within a round, from the step time of each run (`step_time`: blocks of 8 steps, so the block summaries
count), and the median over rounds is reported: this CPU's speed drifts by tens of percent over minutes,
far more than the overhead measured. Then the exact reductions are profiled op by op on the CNN's own tensors
(where b' - a goes), and the statistics store is fed 100k synthetic rows to show its memory stays flat.

    .venv/bin/python benchmarks/stats_overhead.py [--quick] [--steps 64] [--rounds 6] [--threads 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    import resource                 # page-fault counts; Unix only
except ImportError:
    resource = None
from torch import nn

import deepscope
from deepscope.callback import Callback
from deepscope.callbacks import DeviceCallback
from deepscope.cpu_memory import keep_freed_memory
from deepscope.data import DataLoaders
from deepscope.hooks import Hooks, select_modules
from deepscope.learner import Learner
from deepscope.models import cnn
from deepscope.stats import ActivationStats, HistoryStore
from deepscope.stats.collect import activation_stats, flat, gradient_stats
from deepscope.dead import off_rule
from deepscope.stats.engine import DEAD_THRESHOLD, MERGE, STD_OF

VOCAB, SEQ, TEXT_BATCH, N_CLASSES = 1000, 32, 64, 10
GOALS = {"b/a": 1.10, "cnn watch/plain": 1.10, "transformer watch/plain": 1.15, "lstm watch/plain": 1.15,
         "b'/a (exact)": 1.50}


def default_cnn() -> nn.Module:
    return cnn(nfs=[16, 32, 64, 128], norm="batch")


class TransformerClassifier(nn.Module):
    """Tokens -> embedding + learned positions -> 2 encoder layers -> mean over the sequence -> classes."""

    def __init__(self, d_model: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.zeros(SEQ, d_model))
        self.encoder = nn.ModuleList(nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model,
                                                                batch_first=True) for _ in range(layers))
        self.head = nn.Linear(d_model, N_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos          # (B, T, D)
        for layer in self.encoder:
            x = layer(x)                           # (B, T, D)
        return self.head(x.mean(1))                # (B, C)


class LSTMClassifier(nn.Module):
    """Tokens -> embedding -> one LSTM layer -> its last hidden state -> classes."""

    def __init__(self, d_embed: int = 64, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_embed)
        self.lstm = nn.LSTM(d_embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(self.embed(tokens))  # out (B, T, H); h (1, B, H)
        return self.head(h[-1])                      # (B, C)


# name -> (model builder, batch builder, channels_last)
PLAIN_MODELS = {
    "cnn": (default_cnn, lambda: (torch.randn(256, 1, 28, 28), torch.randint(0, N_CLASSES, (256,))), True),
    "transformer": (TransformerClassifier, lambda: (torch.randint(0, VOCAB, (TEXT_BATCH, SEQ)),
                                                    torch.randint(0, N_CLASSES, (TEXT_BATCH,))), False),
    "lstm": (LSTMClassifier, lambda: (torch.randint(0, VOCAB, (TEXT_BATCH, SEQ)),
                                      torch.randint(0, N_CLASSES, (TEXT_BATCH,))), False),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time of each training step, from the start of one batch to the start of the next (the last one
    to the end of the train pass), synchronised on CUDA. First of all callbacks (order -100), so what the
    statistics do in `cleanup_batch` and at the next `before_batch` (block summaries, flushes) counts."""

    order = -100

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    @property
    def times(self) -> list[float]:
        return np.diff(self.stamps).tolist()

    def _stamp(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def before_batch(self, learn) -> None:
        self._stamp()

    def after_train(self, learn) -> None:
        self._stamp()


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


def step_time(times: list[float], block: int = 8) -> float:
    """The time per step of a run: the median over blocks of `block` consecutive steps of their mean. Each
    block holds one of the sampler's block summaries (every 8 recorded steps), so periodic work counts; a
    burst of load from other processes spoils a few blocks, not the figure (a run's mean would take it in).
    The flush every 64 steps falls in one block and is left out: one read-back of the rows per 64 steps."""
    blocks = [statistics.fmean(times[i:i + block]) for i in range(0, len(times) - block + 1, block)]
    return statistics.median(blocks) if blocks else statistics.fmean(times)


def learner_run(batches: list, extra: list, device: torch.device) -> tuple[list[float], float]:
    """Step times of one Learner epoch over `batches` (the first step left out: it warms caches and
    allocators), and the minor page faults per step."""
    torch.manual_seed(0)
    timer = StepTimer(device)
    dls = DataLoaders(train=batches, valid=None)
    learn = Learner(default_cnn(), dls, cbs=[DeviceCallback(device, channels_last=True), timer, *extra],
                    opt_func=torch.optim.AdamW)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0
    learn.fit(1)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0) - faults
    return timer.times[1:], faults / len(batches)


def plain_run(name: str, batches: list, watched: bool, device: torch.device) -> list[float]:
    """Step times of a hand-written AdamW loop over `batches` (already on the device), with
    `deepscope.watch(model, opt)` recording every step when `watched`; the first step left out."""
    torch.manual_seed(0)
    build, _, channels_last = PLAIN_MODELS[name]
    model = build().to(device, memory_format=torch.channels_last) if channels_last else build().to(device)
    opt = torch.optim.AdamW(model.parameters())
    times = []
    with deepscope.watch(model, opt) if watched else contextlib.nullcontext() as w:
        for xb, yb in batches:
            sync(device)
            start = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if w is not None:
                w.step(loss)
            sync(device)
            times.append(time.perf_counter() - start)
    return times[1:]


def exact_profile(batch: tuple, device: torch.device, repeats: int = 5) -> tuple[list[tuple[str, float]], float]:
    """Per-op self CPU time (ms per training step) of collect.activation_stats and gradient_stats on the
    default CNN's own outputs and output gradients of one batch, as b' runs them; and their total."""
    torch.manual_seed(0)
    model = default_cnn().to(device, memory_format=torch.channels_last)
    outputs: list[torch.Tensor] = []
    chosen = select_modules(model)
    rules = [off_rule(m, DEAD_THRESHOLD) for _, m in chosen]  # each module's own off rule, as the engine uses
    hooks = Hooks(chosen, lambda hook, m, i, out: outputs.append(out))
    xb, yb = (t.to(device) for t in batch)
    loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), yb)
    hooks.remove()
    grads = [flat(g) for g in torch.autograd.grad(loss, outputs)]
    values = [flat(o.detach()) for o in outputs]
    out, hist = torch.zeros(6, device=device), torch.zeros(41, device=device)

    def reduce_all() -> None:
        for x, g, rule in zip(values, grads, rules):
            activation_stats(x, rule, (0.0, 10.0), out, hist)
            gradient_stats(g, out)

    reduce_all()  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            reduce_all()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / repeats) for e in prof.key_averages()),
                 key=lambda kv: -kv[1])
    return ops, sum(ms for _, ms in ops)


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


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="training steps per run (64: one statistics flush)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of every arm")
    parser.add_argument("--quick", action="store_true", help="32 steps x 3 rounds (1-2 minutes here): a smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="leave glibc's malloc as it is, instead of keep_freed_memory() as `deepscope` does")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 32, 3
    torch.set_num_threads(args.threads)
    kept = False if args.glibc_default_malloc else keep_freed_memory()
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {os.cpu_count()} CPUs"
    print(f"# stats_overhead: {hw}; torch {torch.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}, deepscope {getattr(deepscope, '__version__', '?')}")
    print(f"# threads {args.threads}, device {device}, keep_freed_memory {kept}, load average (1/5/15 min) {load()}")
    print(f"# Learner: cnn(nfs=[16,32,64,128], norm='batch'), channels_last, AdamW, batch 256. Plain loops: the same "
          f"CNN; Transformer (d_model 64, 2 layers) and LSTM (hidden 128) classifiers, seq {SEQ}, batch {TEXT_BATCH}. "
          f"{args.steps} steps x {args.rounds} rounds, interleaved")
    if hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1) / 2:
        print(f"# warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: the ratios will swing; "
              f"with --threads above 1, parallel ops wait for a descheduled thread (--threads 1 suffers least)")
    started = time.perf_counter()

    torch.manual_seed(0)
    cnn_batches = [PLAIN_MODELS["cnn"][1]() for _ in range(4)]
    learner_batches = [cnn_batches[i % 4] for i in range(args.steps + 1)]
    plain_batches = {}
    for name, (_, make_batch, channels_last) in PLAIN_MODELS.items():
        four = cnn_batches if name == "cnn" else [make_batch() for _ in range(4)]
        four = [(x.to(device, memory_format=torch.channels_last) if channels_last else x.to(device), y.to(device))
                for x, y in four]
        plain_batches[name] = [four[i % 4] for i in range(args.steps + 1)]
    variants = {"a_none": lambda: [], "b_deepscope": lambda: [ActivationStats()], "c_item": lambda: [ItemStats()],
                "b_exact": lambda: [ActivationStats(subsample=None)]}
    names = list(variants)
    times: dict[str, list[float]] = {}
    faults: dict[str, list[float]] = {k: [] for k in variants}
    per_round: list[dict[str, float]] = []
    for r in range(args.rounds):
        means = {}  # arm -> step_time of its run in this round
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            run, run_faults = learner_run(learner_batches, variants[name](), device)
            times.setdefault(name, []).extend(run)
            faults[name].append(run_faults)
            means[name] = step_time(run)
        for model_name in PLAIN_MODELS:
            for watched in ([False, True] if r % 2 == 0 else [True, False]):  # swap the pair's order
                key = f"{model_name}_{'watch' if watched else 'plain'}"
                run = plain_run(model_name, plain_batches[model_name], watched, device)
                times.setdefault(key, []).extend(run)
                means[key] = step_time(run)
        per_round.append(means)
    print(f"# timed in {time.perf_counter() - started:.0f} s; load average after {load()}")
    for k, v in times.items():
        extra = f"  minor page faults/step {statistics.median(faults[k]):6.0f}" if k in faults else ""
        print(f"{k:18s} median {statistics.median(v) * 1e3:8.2f} ms/step  (n={len(v)}){extra}")

    def ratio(num: str, den: str) -> tuple[float, list[float]]:
        """Median over rounds of num/den (each taken within a round), and the per-round values, sorted."""
        values = sorted(m[num] / m[den] for m in per_round)
        return statistics.median(values), values

    results = {"b/a": ratio("b_deepscope", "a_none"), "b'/a (exact)": ratio("b_exact", "a_none")}
    results |= {f"{n} watch/plain": ratio(f"{n}_watch", f"{n}_plain") for n in PLAIN_MODELS}
    c_a, _ = ratio("c_item", "a_none")
    b_a = results["b/a"][0]
    ref = (c_a - 1) / (b_a - 1) if b_a > 1 else float("inf")
    for key, (median, values) in results.items():
        print(f"{key:24s} {median:.3f}   per round: " + " ".join(f"{v:.3f}" for v in values))
    print(f"c/a = {c_a:.3f}   overhead ratio (c-a)/(b-a) = {ref:.1f}")
    goals = [f"{k} <= {goal:.2f} {'met' if results[k][0] <= goal else 'MISSED'} ({results[k][0]:.3f})"
             for k, goal in GOALS.items()]
    goals.append(f"overhead ratio >= 3 {'met' if ref >= 3 else 'MISSED'} ({ref:.1f})")
    print("goals: " + "; ".join(goals))

    ops, total = exact_profile(cnn_batches[0], device)
    extra_ms = statistics.median(m["b_exact"] - m["a_none"] for m in per_round) * 1e3
    print(f"where b' - a goes: {extra_ms:.1f} ms/step over a; the exact reductions of the CNN's outputs and output "
          f"gradients take {total:.1f} ms/step of it when run alone (torch.profiler, self CPU time per op):")
    print("  " + ", ".join(f"{name.removeprefix('aten::')} {ms:.2f}" for name, ms in ops[:10] if ms >= 0.05))
    sizes = store_memory()
    print("store bytes after " + ", ".join(f"{k:,} steps: {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
