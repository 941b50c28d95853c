"""Re-make the README's "lesson's story" evidence: train the plain CNN at a high learning rate and the same
with Kaiming init + BatchNorm, print the table's numbers and the plain run's findings, and write the four
pictures in docs/images.

    .venv/bin/python docs/story.py [--runs runs]      # about 2 minutes on the 2-core CPU
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from deepscope import plots
from deepscope.cli import main as deepscope
from deepscope.stats import load_stats

COMMON = ["--opt", "ds_sgd", "--lr", "0.6", "--schedule", "constant", "--batch-size", "1024", "--epochs", "2",
          "--nfs", "8", "16", "32", "64", "--stats-every", "1", "--threads", "2", "--overwrite"]
RUNS = {"plain-high-lr": ["--norm", "none"], "kaiming-bn": ["--norm", "batch", "--init", "kaiming"]}
ACTS = ["block1.act", "block2.act", "block3.act"]


def summarise(name: str, run: Path) -> None:
    stats = load_stats(run)
    accuracy = json.loads((run / "metrics.json").read_text())[-1]["valid_accuracy"]
    std = stats.act_std[:, stats.modules.index("block3.act")]
    dead = [float(np.nanmean(stats.act_dead[-10:, stats.modules.index(m)])) for m in ACTS]
    print(f"| {name} | {accuracy:.1%} | {np.nanmax(std):.3g} -> {std[-1]:.3g} | "
          + ", ".join(f"{d:.2f}" for d in dead) + " |")
    images = Path(__file__).parent / "images"
    plots.save_png(plots.mean_std_plot(stats, [m for m in stats.modules if m.endswith(".act")]),
                   images / f"{name}-mean-std.png")
    plots.save_png(plots.color_dim_grid(stats, [m for m in stats.modules if m.endswith(".act")]),
                   images / f"{name}-colordim.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs", help="folder for the two run folders (default: %(default)s)")
    args = parser.parse_args()
    for name, extra in RUNS.items():
        run = Path(args.runs) / name
        assert deepscope(["train", *extra, *COMMON, "--out", str(run)]) == 0
    print("| run | test accuracy | ReLU std, peak -> last (block3.act) | dead fraction, last 10 rows (block1..3.act) |")
    for name in RUNS:
        summarise(name, Path(args.runs) / name)
    for f in json.loads((Path(args.runs) / "plain-high-lr" / "findings.json").read_text()):
        print(f"{f['severity'].upper():8s}{f['kind']} [{f['module']}]: {f['message']}")


if __name__ == "__main__":
    main()
