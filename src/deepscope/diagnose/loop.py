"""Findings about the training loop itself, from `Stats.observations` (recorded by stats/loop.py at each
optimiser update): pure functions, so each is tested on plain dictionaries.

- model_in_eval_mode: updates taken while the model or its BatchNorm/Dropout modules were in eval mode
  (a `model.eval()` for validation never undone): BatchNorm then trains on running statistics and
  Dropout is off, so the model trained is not the one intended.
- params_not_in_optimizer: trainable parameters that get gradients no optimizer applies (a layer added
  after the optimizer was made, or a param group left out): they never learn.
- gradients_not_zeroed: gradients from the previous update still there when the next backward pass
  begins, at most updates: nothing clears them, so every step adds all earlier gradients.
"""
from __future__ import annotations

from .finding import Finding
from .thresholds import LOOP_MIN_UPDATES, STALE_GRADIENT_SHARE


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


def analyse_loop(obs: dict | None) -> list[Finding]:
    """Every check on the loop's observations (none when nothing was observed)."""
    if not obs:
        return []
    return check_eval_mode(obs) + check_optimizer_coverage(obs) + check_gradients_zeroed(obs)
