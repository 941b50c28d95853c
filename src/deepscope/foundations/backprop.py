"""Forward and backward passes written from the chain rule, without autograd (fast.ai lesson 8).

Each layer follows the nanoGPT / llm.c shape: `forward(x) -> out` keeps what the backward needs in a
cache, and `backward(dout) -> dx` sits right beside it, applying the local derivative and storing
parameter gradients in `.grads`. Checked against autograd and finite differences in the tests.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


class Linear:
    """out = x @ w + b, with w of shape (n_in, n_out) and b of shape (n_out,)."""

    def __init__(self, n_in: int, n_out: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        # Kaiming (He et al. 2015) scale keeps activation variance steady through a following ReLU.
        self.w = torch.randn(n_in, n_out, generator=generator, dtype=dtype) * math.sqrt(2.0 / n_in)
        self.b = torch.zeros(n_out, dtype=dtype)
        self.grads: dict[str, torch.Tensor] = {}
        self._x: torch.Tensor | None = None

    def params(self) -> dict[str, torch.Tensor]:
        return {"w": self.w, "b": self.b}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x                      # (N, n_in), needed for dL/dw
        return x @ self.w + self.b       # (N, n_in) @ (n_in, n_out) + (n_out,) -> (N, n_out)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        # d(out)/dw = x, d(out)/db = 1, d(out)/dx = w: each multiplied by the upstream gradient.
        self.grads["w"] = self._x.T @ dout   # (n_in, N) @ (N, n_out) -> (n_in, n_out)
        self.grads["b"] = dout.sum(dim=0)    # (N, n_out) -> (n_out,): b is broadcast over the batch
        return dout @ self.w.T               # (N, n_out) @ (n_out, n_in) -> (N, n_in)


class ReLU:
    """out = max(x, 0); its derivative is 1 where x > 0 and 0 elsewhere."""

    def __init__(self):
        self._mask: torch.Tensor | None = None
        self.grads: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._mask = x > 0                   # (N, d) bool
        return x.clamp_min(0.0)              # (N, d)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        return dout * self._mask             # (N, d): gradient passes only where the unit was on


class MSE:
    """Mean squared error over all elements: L = mean((pred - target)^2)."""

    def __init__(self):
        self._diff: torch.Tensor | None = None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._diff = pred - target.reshape(pred.shape)  # (N, d)
        return (self._diff ** 2).mean()                  # scalar

    def backward(self) -> torch.Tensor:
        # dL/dpred = 2 (pred - target) / number of elements; the loss is the start of the chain.
        return 2.0 * self._diff / self._diff.numel()     # (N, d)


class MLP:
    """Linear -> ReLU -> Linear, e.g. 784 -> 50 -> 1 on flattened Fashion-MNIST."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        self.layers = [Linear(n_in, n_hidden, generator, dtype), ReLU(), Linear(n_hidden, n_out, generator, dtype)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):   # the chain rule, applied from the loss backwards
            dout = layer.backward(dout)
        return dout

    def params_and_grads(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, gradient) pairs after a backward pass, for the SGD step."""
        return [(p, layer.grads[name]) for layer in self.layers for name, p in layer.params().items()]


def train_mlp(model: MLP, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1, epochs: int = 1,
              batch_size: int = 64, generator: torch.Generator | None = None) -> list[float]:
    """Minibatch SGD on MSE using only the hand-written backward; returns the loss of each batch.

    `y` may be (N,) or (N, n_out); for 10 classes pass one-hot targets (MSE on one-hot, as in lesson 8).
    """
    loss_fn = MSE()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)   # a fresh shuffle each epoch
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]                               # (B, n_in), (B, ...)
            loss = loss_fn.forward(model.forward(xb), yb)
            model.backward(loss_fn.backward())
            for p, g in model.params_and_grads():
                p -= lr * g   # in-place, so the layers see the new value
            losses.append(float(loss))
    return losses


def finite_difference_grad(f: Callable[[], torch.Tensor], x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences (f(x+eps) - f(x-eps)) / 2eps for every element of x; slow, for checking.

    `f` takes no arguments and reads `x`, which is nudged in place and restored; use float64.
    """
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        up = float(f())
        flat[i] = old - eps
        down = float(f())
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad
