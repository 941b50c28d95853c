"""A classic bug: a softmax at the end of the model, then cross_entropy (which applies its own softmax).

Run: python examples/broken_softmax.py
It prints what `deepscope.diagnose` finds for the broken model, then for the fixed one. Synthetic data,
CPU, a few seconds; nothing is downloaded.
"""
import torch
from torch import nn
from torch.nn import functional as F

from deepscope.diagnose import diagnose_run, format_findings


def make_batches(n=512, n_in=20, n_classes=4, bs=64, seed=0):
    """x ~ N(0, 1); the label is the argmax of a fixed random projection of x (a learnable task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)  # (n, n_in)
    y = (x @ torch.randn(n_in, n_classes, generator=g)).argmax(1)  # (n,) int64 labels
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def mlp(softmax_at_the_end: bool) -> nn.Sequential:
    layers = [nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4)]
    if softmax_at_the_end:
        layers.append(nn.Softmax(dim=1))  # the bug: cross_entropy expects raw logits
    return nn.Sequential(*layers)


if __name__ == "__main__":
    torch.manual_seed(0)
    batches = make_batches()
    print("Broken: Linear -> BatchNorm -> ReLU -> Linear -> Softmax, trained with F.cross_entropy")
    broken = diagnose_run(mlp(softmax_at_the_end=True), batches, F.cross_entropy)
    print(format_findings(broken.findings), end="")
    print(f"checked: {broken.summary()}\n")
    print("Fixed: the same model without the Softmax")
    fixed = diagnose_run(mlp(softmax_at_the_end=False), batches, F.cross_entropy)
    print(format_findings(fixed.findings), end="")
    print(f"checked: {fixed.summary()}")
