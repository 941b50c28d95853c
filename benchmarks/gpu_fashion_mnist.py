"""The default recipe on a GPU: samples/s and accuracy of the Learner against a plain loop, same GPU.

Both keep the whole dataset on the device (moved once), use channels-last memory and bfloat16 autocast, and
take the same batches from the same permutation; `--compile` runs both through torch.compile (Inductor): the
plain loop compiles its model, the Learner gets `train --compile`'s Compile callback.
The Learner runs with its default `deepscope train` callbacks (metrics, recorder, schedule, statistics,
diagnosis, per-phase timing). Runs are interleaved (Learner, plain, Learner, ...) so drifts hit both alike.

    python benchmarks/gpu_fashion_mnist.py [--epochs 5 20] [--rounds 2] [--compile]

Needs CUDA and the Fashion-MNIST files; says so and exits 0 without them (nothing to measure here).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def plain_loop(config, dls, epochs: int) -> tuple[float, float]:
    from deepscope.callbacks.schedule import one_cycle_lr
    from deepscope.recipe import build_model, make_optimizer_factory

    torch.manual_seed(config.seed)
    model = build_model(config, 10).cuda().to(memory_format=torch.channels_last)
    run = torch.compile(model) if config.compile else model
    opt = make_optimizer_factory(config)(model.parameters(), config.lr)
    schedule, total, step = one_cycle_lr(config.lr), epochs * len(dls.train), 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for xb, yb in dls.train:
            for group in opt.param_groups:
                group["lr"] = schedule(step / total)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(run(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for xb, yb in dls.valid:
            correct += (run(xb).argmax(1) == yb).sum().item()
    return seconds, correct / len(dls.valid.x)


def learner(config, dls, epochs: int) -> tuple[float, float]:
    from deepscope.callbacks import MetricsCallback
    from deepscope.recipe import build_learner, looking_inside_callbacks

    torch.manual_seed(config.seed)
    learn = build_learner(config, dls, looking_inside_callbacks(config, None), progress=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    learn.fit(epochs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, learn.get_cb(MetricsCallback).history[-1]["valid_accuracy"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (this benchmark compares the Learner and a plain loop on a GPU)")
        return 0
    from deepscope.config import TrainConfig
    from deepscope.data import image_dls

    config = TrainConfig(device="cuda", precision="bf16", compile="inductor" if args.compile else None)
    dls = image_dls(config.dataset, config.data_dir, config.batch_size, seed=config.seed, download=False)
    dls.to("cuda", memory_format=torch.channels_last)
    n = len(dls.train.x)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, compile={args.compile}")
    for epochs in args.epochs:
        times = {"learner": [], "plain": []}
        for _ in range(args.rounds):
            for name, fit in (("learner", learner), ("plain", plain_loop)):
                seconds, accuracy = fit(config, dls, epochs)
                times[name].append(seconds)
                print(f"{epochs:3d} epochs  {name:8s} {seconds:7.1f} s  {epochs * n / seconds:9.0f} samples/s  "
                      f"accuracy {100 * accuracy:.2f}%", flush=True)
        ratio = statistics.median(times["learner"]) / statistics.median(times["plain"])
        print(f"{epochs:3d} epochs  Learner/plain time ratio {ratio:.3f} (median of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
