"""What does checkpointing every 100 steps cost the default run? (Issue goal: at most 3 % of its time.)

Two measurements, because timings on a shared machine swing by 15 % and more:

1. In place: the default `deepscope train` learner (BatchNorm CNN, one-cycle AdamW, statistics, diagnosis)
   on Fashion-MNIST for `--epochs` epochs, with `Checkpoint(every=100)`; the time spent writing checkpoints
   (taking the whole state, encoding it, SHA-256, fsync, rename, pruning) is summed and divided by the fit's
   wall time. Immune to drift between runs.
2. A/B: one-epoch fits with and without step checkpoints (both keep the end-of-epoch one, as `train`
   always does), interleaved round by round so drifts in machine load hit both alike; median ratio.

    python benchmarks/checkpoint_overhead.py [--epochs 5] [--rounds 3] [--every 100] [--threads 2]

Uses the real data when it is installed (Debian's dataset-fashion-mnist), else the same number of random
images (the cost of a checkpoint does not depend on the pixels).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deepscope.callbacks import Checkpoint
from deepscope.config import TrainConfig
from deepscope.cpu_memory import keep_freed_memory
from deepscope.data import DataLoaders, TensorBatches, image_dls
from deepscope.errors import DataError
from deepscope.recipe import build_learner, looking_inside_callbacks


class TimedCheckpoint(Checkpoint):
    """Checkpoint that adds up the seconds its writes take."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds, self.writes = 0.0, 0

    def _write(self, learn, at, steps):
        start = time.perf_counter()
        try:
            return super()._write(learn, at, steps)
        finally:
            self.seconds += time.perf_counter() - start
            self.writes += 1


def data(config: TrainConfig) -> DataLoaders:
    try:
        return image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, download=False)
    except DataError:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(60000, 1, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g)
        gen = torch.Generator().manual_seed(config.seed)
        return DataLoaders(TensorBatches(x, y, config.batch_size, shuffle=True, generator=gen),
                           TensorBatches(x[:10000], y[:10000], 2 * config.batch_size), n_classes=10,
                           info={"dataset": "random"})


def fit(config: TrainConfig, every: int | None, folder: Path, epochs: int) -> tuple[float, TimedCheckpoint]:
    torch.manual_seed(config.seed)
    dls = data(config)
    ckpt = TimedCheckpoint(folder, every=every, keep_last=2, extra={"config": config.to_dict()})
    learn = build_learner(config, dls, [*looking_inside_callbacks(config, None), ckpt], progress=False)
    start = time.perf_counter()
    learn.fit(epochs)
    return time.perf_counter() - start, ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="epochs of the in-place measurement (default run: 5)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds of one epoch each (0 skips them)")
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `deepscope train` does (cpu_memory.py)
    config = TrainConfig(device="cpu")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        seconds, ckpt = fit(config, args.every, Path(tmp) / "in-place", args.epochs)
        size = sum(p.stat().st_size for p in (Path(tmp) / "in-place").glob("step-*.safetensors")) / max(
            1, len(list((Path(tmp) / "in-place").glob("step-*.safetensors"))))
        print(f"in place: {args.epochs} epochs in {seconds:.1f} s; {ckpt.writes} checkpoints ({size / 1e6:.1f} MB each) "
              f"took {ckpt.seconds:.2f} s = {100 * ckpt.seconds / seconds:.2f} % of the fit "
              f"({1000 * ckpt.seconds / max(1, ckpt.writes):.0f} ms each)")
        ratios = []
        for r in range(args.rounds):
            if r % 2:  # alternate which goes first: the first fit of a pair pays for the garbage of the last
                without, _ = fit(config, None, Path(tmp) / f"b{r}", 1)
                with_every, _ = fit(config, args.every, Path(tmp) / f"a{r}", 1)
            else:
                with_every, _ = fit(config, args.every, Path(tmp) / f"a{r}", 1)
                without, _ = fit(config, None, Path(tmp) / f"b{r}", 1)
            ratios.append(with_every / without)
            print(f"round {r + 1}: every {args.every} steps {with_every:.1f} s, epoch ends only {without:.1f} s, "
                  f"ratio {ratios[-1]:.3f}")
        if ratios:
            print(f"A/B median ratio {statistics.median(ratios):.3f} (noise here is several %; the in-place figure "
                  f"is the one to read)")


if __name__ == "__main__":
    main()
