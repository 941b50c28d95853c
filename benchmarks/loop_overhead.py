"""How much does the Learner cost over a hand-written loop, and the in-memory feed over a DataLoader?

Same model (the default BatchNorm CNN), data, optimizer and batches, trained alternately by a plain PyTorch
loop and by the Learner with its default callbacks (device, metrics, recorder, progress without bars),
interleaved round by round so drifts in machine load hit both alike. Prints medians and ratios.

    python benchmarks/loop_overhead.py [--rounds 7] [--batches 40] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from deepscope.callbacks import DeviceCallback, MetricsCallback, ProgressCallback, Recorder
from deepscope.data import DataLoaders, TensorBatches
from deepscope.learner import Learner
from deepscope.models import cnn


def synthetic(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def fresh_model():
    torch.manual_seed(0)
    return cnn(nfs=(16, 32, 64, 128), norm="batch").to(memory_format=torch.channels_last)


def plain_loop(x, y, bs: int) -> float:
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for xb, yb in TensorBatches(x, y, bs, shuffle=True):
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def learner_loop(x, y, bs: int) -> float:
    dls = DataLoaders(TensorBatches(x, y, bs, shuffle=True), None, n_classes=10)
    cbs = [DeviceCallback("cpu", channels_last=True), MetricsCallback(), Recorder(), ProgressCallback(bars=False, table=False)]
    learn = Learner(fresh_model(), dls, lr=1e-3, opt_func=torch.optim.AdamW, cbs=cbs)
    start = time.perf_counter()
    learn.fit(1, valid=False)
    return time.perf_counter() - start


def feed(batches) -> float:
    start = time.perf_counter()
    for xb, yb in batches:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=40, help="training batches per timed run")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.batches * args.batch_size
    x, y = synthetic(n)
    x = x.contiguous(memory_format=torch.channels_last)
    print(f"# loop_overhead: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.batches} batches of {args.batch_size}, {args.rounds} interleaved rounds")
    plain_loop(x, y, args.batch_size), learner_loop(x, y, args.batch_size)  # warm-up: allocator, kernels
    plain, learner = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(x, y, args.batch_size))
        learner.append(learner_loop(x, y, args.batch_size))
    p, l = statistics.median(plain), statistics.median(learner)
    print(f"plain loop     median {p * 1000 / args.batches:8.2f} ms/batch")
    print(f"Learner        median {l * 1000 / args.batches:8.2f} ms/batch")
    print(f"ratio Learner/plain: {l / p:.3f}  (goal <= 1.02)")
    # Feeding only: slicing a shuffled index of in-memory tensors vs a DataLoader over a TensorDataset.
    fx, fy = synthetic(60000, seed=1)
    dataset = torch.utils.data.TensorDataset(fx, fy)
    in_memory, loader = [], []
    for _ in range(max(3, args.rounds // 2)):
        in_memory.append(feed(TensorBatches(fx, fy, args.batch_size, shuffle=True)))
        loader.append(feed(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)))
    m, d = statistics.median(in_memory), statistics.median(loader)
    print(f"one epoch of batches (60000 items): in-memory {m * 1000:.0f} ms, DataLoader {d * 1000:.0f} ms, "
          f"ratio DataLoader/in-memory {d / m:.1f}x")


if __name__ == "__main__":
    main()
