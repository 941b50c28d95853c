"""Small models and data shared by the diagnosis tests (no tests here: imported by the test_diagnose_* modules)."""
import torch
from torch import nn

N, D, C, BS = 256, 16, 4, 32


def make_batches(n=N, d=D, bs=BS, scale=1.0, shift=0.0, seed=0):
    """A learnable synthetic task: the label is the argmax of a fixed random projection; x ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, C, generator=g)).argmax(1)
    x = x * scale + shift
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def image_batches(n=N, bs=BS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() * 2 + (x[:, 0, 0, 0] > 0).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def healthy_mlp(d=D, c=C, h=32):
    return nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
                         nn.Linear(h, c))


def healthy_cnn(c=C):
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, c))


def plain_mlp(d=D, c=C, h=32, depth=2):
    layers, n_in = [], d
    for _ in range(depth):
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    return nn.Sequential(*layers, nn.Linear(n_in, c))
