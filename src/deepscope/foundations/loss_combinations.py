"""The lesson's poll, measured: which of FC+{Softmax, LogSoftmax}+{NLL, CE} is a correct classifier loss?

NLL expects log-probabilities; CE expects raw logits (it applies log-softmax itself). So:
  - FC + LogSoftmax + NLL  correct (this is what CE does inside)
  - FC + LogSoftmax + CE   also correct: log_softmax is idempotent, log_softmax(log_softmax(z)) = log_softmax(z)
  - FC + Softmax + NLL     wrong: the "loss" is -p_target, in [-1, 0], not a log-likelihood; its gradient
                           vanishes when the model is confidently wrong
  - FC + Softmax + CE      wrong: a double softmax squashes logits into [0, 1], so targets can never get
                           much probability and the gradient stays small; it trains slowly
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .softmax import cross_entropy, log_softmax, nll, softmax

# name -> (loss built from logits and targets, whether it is a correct log-likelihood loss)
COMBINATIONS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bool]] = {
    "FC+Softmax+NLL": (lambda z, y: nll(softmax(z), y), False),
    "FC+LogSoftmax+NLL": (lambda z, y: nll(log_softmax(z), y), True),
    "FC+Softmax+CE": (lambda z, y: cross_entropy(softmax(z), y), False),
    "FC+LogSoftmax+CE": (lambda z, y: cross_entropy(log_softmax(z), y), True),
}


@dataclass
class CombinationResult:
    name: str
    correct: bool
    final_loss: float      # the value the combination itself reports
    true_ce: float         # cross-entropy of the trained model's logits: the same yardstick for all
    accuracy: float        # on the training data


def separable_blobs(n_per_class: int = 100, n_classes: int = 10, n_features: int = 20,
                    spread: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random centres: linearly separable with high probability."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, n_features, generator=g) * spread         # (C, D)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)                  # (N,)
    x = centres[y] + torch.randn(len(y), n_features, generator=g)               # (N, D)
    return x, y


def compare_loss_combinations(steps: int = 100, lr: float = 0.1, seed: int = 0) -> list[CombinationResult]:
    """Train the same linear classifier (same init, same data) with each combination; full-batch SGD."""
    x, y = separable_blobs(seed=seed)
    results = []
    for name, (loss_fn, correct) in COMBINATIONS.items():
        torch.manual_seed(seed)
        model = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = loss_fn(model(x), y)        # (N, C) logits -> scalar
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = model(x)
            results.append(CombinationResult(
                name, correct, float(loss_fn(logits, y)), float(cross_entropy(logits, y)),
                float((logits.argmax(dim=1) == y).float().mean())))
    return results


def format_combinations(results: list[CombinationResult]) -> str:
    """A markdown table of the measured results."""
    lines = ["| combination | correct? | its own final loss | true cross-entropy | train accuracy |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {'yes' if r.correct else 'no'} | {r.final_loss:.4f} | "
                     f"{r.true_ce:.4f} | {r.accuracy:.3f} |")
    return "\n".join(lines)
