"""Why not initialise weights to zero? One zero layer at the end is fine; two in a row never learn.

For the MLP out = h @ w2 + b2, h = relu(x @ w1 + b1), backprop gives dL/dw2 = h^T dout, dL/dh = dout w2^T,
dL/dw1 = x^T (dL/dh * relu'(pre)):
  - only the last layer zero: h is non-zero (w1 is random), so dL/dw2 != 0; w2 moves off zero at the first
    step and from then on w1 gets gradient too. It learns.
  - both layers zero: h = relu(0) = 0, so dL/dw2 = h^T dout = 0, and dL/dh = dout w2^T = 0, so dL/dw1 = 0.
    No weight can ever change; only the output bias learns (it fits the mean target).
  - only the first layer zero also stalls here, for a reason specific to ReLU: every pre-activation is
    exactly 0 and torch takes relu'(0) = 0, so dL/dw1 = 0, and h = 0 gives dL/dw2 = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ZeroInitResult:
    zero_layers: tuple[int, ...]
    grad_norms: dict[str, list[float]]  # each Linear weight's gradient norm at every step
    weights_moved: dict[str, bool]      # whether each weight differs from its initial value at the end
    initial_loss: float
    final_loss: float


def zero_init_mlp(n_in: int, n_hidden: int, n_out: int, zero_layers: tuple[int, ...]) -> nn.Sequential:
    """Linear -> ReLU -> Linear, with the Linear layers listed (0 = first, 1 = last) set to all zeros."""
    model = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))
    linears = [model[0], model[2]]
    for i in zero_layers:
        nn.init.zeros_(linears[i].weight)
        nn.init.zeros_(linears[i].bias)
    return model


def run_zero_init_experiment(zero_layers: tuple[int, ...], steps: int = 100, lr: float = 0.1,
                             seed: int = 0) -> ZeroInitResult:
    """Fit a nonlinear target with full-batch SGD; record weight gradients and whether weights moved."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)                      # (N, 8)
    y = (x[:, :1] * x[:, 1:2]).tanh() + x[:, 2:3].sin()       # (N, 1): needs a hidden layer to fit
    torch.manual_seed(seed)
    model = zero_init_mlp(8, 32, 1, zero_layers)
    linears = {"first": model[0], "last": model[2]}
    start = {name: m.weight.detach().clone() for name, m in linears.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grad_norms: dict[str, list[float]] = {name: [] for name in linears}
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        for name, m in linears.items():
            grad_norms[name].append(float(m.weight.grad.norm()))
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    moved = {name: not torch.equal(m.weight, start[name]) for name, m in linears.items()}
    return ZeroInitResult(zero_layers, grad_norms, moved, losses[0], final)
