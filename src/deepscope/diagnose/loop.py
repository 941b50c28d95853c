"""Findings about the training loop itself, from `Stats.observations` (recorded by stats/loop.py at each
optimiser update): pure functions, so each is tested on plain dictionaries.

- model_in_eval_mode: updates taken while the model or its BatchNorm/Dropout modules were in eval mode
  (a `model.eval()` for validation never undone): BatchNorm then trains on running statistics and
  Dropout is off, so the model trained is not the one intended.
- params_not_in_optimizer: trainable parameters that get gradients no optimizer applies (a layer added
  after the optimizer was made, or a param group left out): they never learn.
- gradients_not_zeroed: gradients from the previous update still there when the next backward pass
  begins, at most updates: nothing clears them, so every step adds all earlier gradients.
- unshuffled_batches: class targets that arrive unshuffled: batches holding one or two classes each while
  shuffled batches of their size would hold far more, or a mean label rising (falling) batch after batch.
  Needs the targets (`w.step(loss, targets=yb)`); float (regression) targets are not judged.
"""
from __future__ import annotations

import statistics

from .finding import Finding
from .thresholds import (
    LOOP_MIN_UPDATES, STALE_GRADIENT_SHARE, UNSHUFFLED_BATCH_CLASSES, UNSHUFFLED_CLASS_RATIO, UNSHUFFLED_EPOCH_BATCHES,
    UNSHUFFLED_MANY_CLASSES, UNSHUFFLED_MIN_BATCHES, UNSHUFFLED_MIN_CHANGES, UNSHUFFLED_ORDER_SHARE,
)


def check_eval_mode(obs: dict) -> list[Finding]:
    updates, off = obs.get("updates", 0), obs.get("eval_updates", 0)
    if not updates or not off:
        return []
    modules = obs.get("eval_modules") or []
    where = "the model" if "" in modules else ", ".join(repr(m) for m in modules[:4])
    return [Finding("model_in_eval_mode", "" if "" in modules else modules[0], "error",
                    f"{off} of {updates} optimizer steps were taken with {where} in eval mode: BatchNorm uses its "
                    f"running statistics and Dropout is off, so training does not train the model you meant.",
                    "Call model.train() before the training steps (after each validation pass that called "
                    "model.eval()).", {"updates": updates, "eval_updates": off, "eval_modules": modules})]


def check_optimizer_coverage(obs: dict) -> list[Finding]:
    missing = obs.get("not_in_optimizer") or []
    if not missing:
        return []
    shown = ", ".join(repr(m or "(the model)") for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return [Finding("params_not_in_optimizer", missing[0], "error",
                    f"Trainable parameters of {shown} receive gradients, but the optimizer does not hold them: they "
                    f"never change.",
                    "Create the optimizer after the model is complete, from model.parameters(), or add the "
                    "missing parameters with optimizer.add_param_group(...).", {"modules": missing})]


def check_gradients_zeroed(obs: dict) -> list[Finding]:
    checks, stale = obs.get("gradient_checks", 0), obs.get("stale_gradients", 0)
    if checks < LOOP_MIN_UPDATES or stale < STALE_GRADIENT_SHARE * checks:
        return []
    return [Finding("gradients_not_zeroed", "", "error",
                    f"At {stale} of {checks} optimizer steps the previous step's gradients were still there when the "
                    f"next backward pass began: nothing clears them, so each step adds up every earlier gradient.",
                    "Call optimizer.zero_grad() once per step, before loss.backward() (for gradient accumulation: "
                    "after each optimizer.step()).", {"gradient_checks": checks, "stale_gradients": stale})]


def expected_classes(class_counts: list[int], batch_size: int) -> float:
    """Distinct classes expected in a random batch of `batch_size` labels drawn with the run's class
    frequencies: the sum over the classes of 1 - (1 - p)^batch_size."""
    total = sum(class_counts)
    return sum(1 - (1 - c / total) ** batch_size for c in class_counts) if total else 0.0


def label_order(means: list[float]) -> tuple[str, float, int]:
    """Which way the batches' mean label moves ("rises" or "falls"), the share of its changes that go that
    way and how many changes were counted. Reversals of half the whole range or more are epochs starting
    over, and are not counted, as long as they are rare (one per UNSHUFFLED_EPOCH_BATCHES batches at most)."""
    diffs = [b - a for a, b in zip(means, means[1:]) if b != a]
    if not diffs:
        return "rises", 0.0, 0
    wrap = (max(means) - min(means)) / 2
    best = ("rises", 0.0, 0, 0)
    for name, sign in (("rises", 1), ("falls", -1)):
        along = sum(d * sign > 0 for d in diffs)
        small = sum(-wrap < d * sign < 0 for d in diffs)
        restarts = sum(d * sign <= -wrap for d in diffs)
        against = small if restarts * UNSHUFFLED_EPOCH_BATCHES <= len(means) - 1 else small + restarts
        share = along / (along + against) if along else 0.0
        if (share, along) > best[1::2]:
            best = (name, share, along + against, along)
    return best[:3]


def check_batch_shuffling(obs: dict) -> list[Finding]:
    """unshuffled_batches: see the module docstring and thresholds.py (UNSHUFFLED_*)."""
    n, counts = obs.get("label_batches", 0), [c for c in obs.get("class_counts") or [] if c > 0]
    if n < UNSHUFFLED_MIN_BATCHES or len(counts) < 2:
        return []
    classes, sizes = obs["batch_classes"][:n], obs["batch_sizes"][:n]
    median, size = statistics.median(classes), int(statistics.median(sizes))
    expected = statistics.median(expected_classes(counts, s) for s in sizes)
    direction, share, changes = label_order(obs.get("batch_label_means") or [])
    ordered = share >= UNSHUFFLED_ORDER_SHARE
    few = (median <= UNSHUFFLED_BATCH_CLASSES and expected >= UNSHUFFLED_CLASS_RATIO * median
           and (len(counts) >= UNSHUFFLED_MANY_CLASSES or ordered))
    if not (few or (ordered and changes >= UNSHUFFLED_MIN_CHANGES)):
        return []
    order = f" and the mean label {direction} in {share:.0%} of its {changes} changes" if ordered else ""
    return [Finding("unshuffled_batches", "", "error",
                    f"Over {n} training batches the median batch holds {median:g} of the run's {len(counts)} classes "
                    f"(a shuffled batch of {size} would hold about {expected:.1f}){order}: the data is not shuffled, "
                    f"so each step fits a few classes and undoes what the steps before it learned.",
                    "Shuffle the training data: DataLoader(dataset, batch_size=..., shuffle=True), or a sampler that "
                    "draws random indices.",
                    {"batches": n, "median_batch_classes": median, "run_classes": len(counts),
                     "expected_shuffled_classes": round(expected, 2), "median_batch_size": size,
                     "label_order": direction if ordered else None, "label_order_share": round(share, 3),
                     "label_changes": changes})]


def analyse_loop(obs: dict | None) -> list[Finding]:
    """Every check on the loop's observations (none when nothing was observed)."""
    if not obs:
        return []
    return (check_eval_mode(obs) + check_optimizer_coverage(obs) + check_gradients_zeroed(obs)
            + check_batch_shuffling(obs))
