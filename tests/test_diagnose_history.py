"""diagnose.history: the whole run's statistics and losses to findings (pure functions on made-up arrays),
and the Diagnose callback reading them from ActivationStats and Recorder during a real fit."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from deepscope import Learner
from deepscope.callbacks import Recorder
from deepscope.data import DataLoaders
from deepscope.diagnose import Diagnose, Finding, merge_findings, problems
from deepscope.diagnose.history import check_activation_crash, check_dead_history, check_loss_history
from deepscope.diagnose.thresholds import DEAD_VALUES_ERROR, DEAD_VALUES_WARNING
from deepscope.stats import ActivationStats

CHANCE = math.log(10)


def curve(first, peak, peak_at, final, n=118):
    """A std (or dead fraction) history: linear from `first` up to `peak` at row `peak_at`, then down to
    `final` within ten rows and flat to the end."""
    up = np.linspace(first, peak, peak_at + 1)
    down = np.linspace(peak, final, 11)[1:]
    return np.concatenate([up, down, np.full(n - len(up) - len(down), final)])


# --- activation_collapse over time --------------------------------------------------------------------------
# (first, peak at row, final) of the plain CNN at lr 0.6 (/tmp/story-plain/stats.npz, every=1, 118 rows).
PLAIN_RUN = {"block0.conv": (0.68, 1.56, 51, 0.43), "block0.act": (0.36, 0.99, 44, 0.17),
             "block1.conv": (0.23, 1.64, 100, 0.155), "block1.act": (0.125, 1.37, 44, 0.051),
             "block2.conv": (0.09, 1.92, 45, 0.058), "block2.act": (0.047, 1.37, 44, 0.02),
             "block3.act": (0.026, 1.53, 45, 0.025), "head": (0.083, 3.14, 45, 0.051)}


def stds(layers):
    """(modules, steps, act_std) for {module: (first, peak, peak row, final)}."""
    return list(layers), np.arange(118), np.stack([curve(*v) for v in layers.values()], axis=1)


def test_rise_and_crash_of_the_plain_run_names_the_first_layer():
    [f] = check_activation_crash(*stds(PLAIN_RUN))
    assert (f.kind, f.module, f.severity) == ("activation_collapse", "block1.act", "warning")
    assert f.evidence["peak_step"] == 44 and f.evidence["peak_std"] == pytest.approx(1.37)
    assert f.evidence["final_std"] == pytest.approx(0.051, rel=1e-3)
    assert f.evidence["collapsed"][:3] == ["block1.act", "block2.conv", "block2.act"]
    assert "block1.act" in f.message and "1.37" in f.message


def test_healthy_run_and_a_layer_that_settles_are_not_a_crash():
    healthy = {"block0.act": (0.62, 0.64, 1, 0.30), "block3.act": (0.59, 0.64, 24, 0.55), "head": (0.48, 1.96, 84, 1.87)}
    assert check_activation_crash(*stds(healthy)) == []
    settles = {"big": (5.0, 50.0, 10, 4.0)}  # 12x down but still far from zero: ACT_CRASH_FLOOR
    assert check_activation_crash(*stds(settles)) == []


def test_crash_ignores_nonfinite_rows_and_short_histories():
    modules, steps, act_std = stds({"a": (0.1, 1.5, 40, 0.01)})
    act_std[5:8] = np.nan
    act_std[20] = np.inf
    assert [f.module for f in check_activation_crash(modules, steps, act_std)] == ["a"]
    assert check_activation_crash(modules, steps[:5], act_std[:5]) == []
    assert check_activation_crash([], np.zeros(0), np.zeros((0, 0))) == []


# --- dead_units from the history ----------------------------------------------------------------------------
def test_dead_fraction_at_the_end_is_flagged_above_threshold():
    modules = ["block1.conv", "block1.act", "block2.act", "block3.act", "gone"]
    dead = np.stack([np.full(118, 0.005), curve(0.55, 0.87, 50, 0.82), curve(0.62, 0.89, 50, 0.86),
                     np.full(118, 0.51), curve(0.5, 1.0, 30, 1.0)], axis=1)
    found = check_dead_history(modules, np.arange(118), dead)
    assert [(f.module, f.severity) for f in found] == [("block1.act", "warning"), ("block2.act", "warning"),
                                                      ("gone", "error")]
    assert found[0].evidence["dead_fraction"] == pytest.approx(0.82)
    assert found[0].evidence["first_dead_fraction"] == pytest.approx(0.55)


def test_relu_layers_of_a_healthy_run_are_not_dead():
    # ReLU outputs are about half zeros: 0.44-0.56 in the healthy runs with BatchNorm.
    dead = np.stack([np.full(47, 0.48), np.full(47, 0.56), np.full(47, DEAD_VALUES_WARNING)], axis=1)
    assert check_dead_history(["a", "b", "c"], np.arange(0, 235, 5), dead) == []
    assert DEAD_VALUES_WARNING < DEAD_VALUES_ERROR <= 1


# --- lr_too_high from the loss history ------------------------------------------------------------------------
def story_losses():
    """The plain run's losses: down from chance to ~2.0 by step 42, a spike to 3.3, then flat at chance."""
    return [*np.linspace(2.303, 2.0, 43), 3.3, 2.6, *np.full(73, 2.30)]


def test_loss_stuck_at_chance_after_learning_is_an_error():
    [f] = check_loss_history(story_losses(), n_classes=10)
    assert (f.kind, f.module, f.severity) == ("lr_too_high", "", "error")
    assert "no better than chance" in f.message and "died" in f.message
    assert f.evidence["chance_loss"] == pytest.approx(CHANCE) and f.evidence["peak_step"] == 43


def test_loss_at_chance_that_never_went_lower_is_not_divergence():
    assert check_loss_history([CHANCE + 0.01 * math.sin(i) for i in range(100)], n_classes=10) == []


def test_without_n_classes_only_the_spike_is_seen():
    assert check_loss_history(story_losses(), n_classes=None) == []  # 3.3 / 2.3 = 1.43x: below the spike ratio
    spike = [2.3, 2.2, 2.1, 4.0, 2.0, *np.linspace(1.9, 0.5, 40)]
    [f] = check_loss_history(spike, n_classes=10)
    assert (f.severity, f.evidence["peak_step"]) == ("warning", 3)
    [f] = check_loss_history([2.3, 2.2, 5.0, *np.linspace(2.0, 0.5, 40)])
    assert f.severity == "error"  # above twice the first loss: LOSS_RISE_ERROR


def test_healthy_loss_and_nonfinite_tail():
    healthy = [*np.linspace(2.38, 0.5, 118)]
    assert check_loss_history(healthy, n_classes=10) == []
    assert check_loss_history([*healthy[:50], float("nan"), 9.0, 9.0], n_classes=10) == []  # NaN: the probe's job
    assert check_loss_history([2.3] * 5, n_classes=10) == []


# --- merging with what the probe found -----------------------------------------------------------------------
def test_merge_keeps_one_finding_per_kind_and_module_the_more_severe():
    probe = [Finding("lr_too_high", "", "warning", "probe", ""), Finding("dead_units", "a", "warning", "probe", "")]
    history = [Finding("lr_too_high", "", "error", "history", ""), Finding("dead_units", "a", "warning", "history", ""),
               Finding("dead_units", "b", "warning", "history", "")]
    merged = merge_findings(probe, history)
    assert [(f.kind, f.module, f.message) for f in merged] == [
        ("lr_too_high", "", "history"), ("dead_units", "a", "probe"), ("dead_units", "b", "history")]


# --- the story, for real: a plain CNN at a huge learning rate -------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def image_dls(n_classes=10):
    """8x8 noise images labelled by a fixed random projection: learnable, no download."""
    proj = torch.randn(64, n_classes, generator=torch.Generator().manual_seed(99))

    def batches(n, seed):
        x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        y = (x.flatten(1) @ proj).argmax(1)
        return [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]
    return DataLoaders(batches(1024, 0), batches(128, 1), n_classes=n_classes)


def cnn(norm: bool, n_classes=10):
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), *([nn.BatchNorm2d(o)] if norm else []), nn.ReLU())
    return nn.Sequential(block(1, 8), block(8, 16), block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, n_classes))


def fit(model, lr, epochs):
    diag = Diagnose()
    learn = Learner(model, image_dls(), lr=lr, opt_func=torch.optim.SGD, cbs=[ActivationStats(every=1), Recorder(), diag])
    learn.fit(epochs)
    return diag.findings


def test_plain_cnn_at_a_huge_learning_rate_is_found_dead():
    torch.manual_seed(0)
    findings = fit(cnn(norm=False), lr=5.0, epochs=3)
    kinds = {(f.kind, f.module) for f in problems(findings)}
    assert ("activation_collapse", "1.1") in kinds or ("dead_units", "1.1") in kinds, findings
    assert len(kinds) == len(findings)  # one finding per kind and module


def test_cnn_with_batchnorm_at_a_sane_learning_rate_has_no_problems():
    torch.manual_seed(0)
    assert problems(fit(cnn(norm=True), lr=0.1, epochs=2)) == []


def test_a_nan_anywhere_in_the_loss_history_is_reported_with_its_step():
    from deepscope.diagnose.history import check_nonfinite_history

    losses = [2.3, 2.1, 1.9, float("nan"), float("nan")]
    (f,) = check_nonfinite_history(losses)
    assert f.kind == "diverged" and f.severity == "error" and f.evidence["step"] == 3  # steps count from 0, as learn.train_iter and the statistics' rows
    assert "1.9" in f.message
    (f,) = check_nonfinite_history([2.3, 2.2], [float("inf")])
    assert f.evidence["epoch"] == 1 and "validation loss" in f.message
    assert check_nonfinite_history([2.3, 2.2], [2.1, None]) == []
    assert check_nonfinite_history([]) == []


def test_not_learning_at_chance_and_flat_and_not_on_healthy_or_diverged_runs():
    import math

    from deepscope.diagnose.history import check_not_learning

    rng = np.random.default_rng(0)
    chance = math.log(10)
    stuck = list(chance + rng.normal(0, 0.02, 300))
    (f,) = check_not_learning(stuck, n_classes=10)
    assert f.kind == "not_learning" and f.severity == "error" and f.evidence["steps"] == 300
    assert check_not_learning(stuck[:99], n_classes=10) == [], "too short to judge"
    healthy = list(chance * np.exp(-np.arange(300) / 80) + 0.2 + rng.normal(0, 0.02, 300))
    assert check_not_learning(healthy, n_classes=10) == []
    came_back = list(np.r_[np.linspace(chance, 1.0, 100), np.full(200, chance)])  # lr_too_high's case
    assert check_not_learning(came_back, n_classes=10) == []
    flat = list(0.8 + rng.normal(0, 0.005, 200))  # a regression loss that does not move
    (f,) = check_not_learning(flat)
    assert f.severity == "warning"
    assert check_not_learning(list(np.linspace(0.8, 0.5, 200))) == []


def test_symptoms_are_listed_under_their_cause():
    from deepscope.diagnose.finding import Finding, format_findings, sort_findings

    f = lambda kind, module="", severity="error": Finding(kind, module, severity, f"{kind} here", "fix it")  # noqa: E731
    found = sort_findings([f("dead_units", "act1", "warning"), f("activation_collapse", "conv2", "warning"),
                           f("lr_too_high"), f("diverged"), f("dead_units", "act3", "warning")])
    assert [x.kind for x in found] == ["lr_too_high", "diverged", "dead_units", "dead_units", "activation_collapse"]
    assert found[0].caused_by == "" and {x.caused_by for x in found[1:]} == {"lr_too_high"}
    text = format_findings(found)
    assert "caused by lr_too_high" in text and text.index("lr_too_high [") < text.index("dead_units [")
    # without the learning rate, the collapse explains the dead units (a collapsed signal sits at the floor)
    alone = sort_findings([f("dead_units", "act1", "warning"), f("activation_collapse", "conv2", "warning")])
    assert [(x.kind, x.caused_by) for x in alone] == [("activation_collapse", ""), ("dead_units", "activation_collapse")]
    # two kinds never explain each other: only a kind listed earlier in CAUSES can be a cause
    pair = sort_findings([f("gradient_explosion", "rnn"), f("activation_collapse", "fc", "warning")])
    assert [(x.kind, x.caused_by) for x in pair] == [("gradient_explosion", ""), ("activation_collapse", "gradient_explosion")]
    # a loop bug explains the divergence it caused
    bug = sort_findings([f("lr_too_high"), f("gradients_not_zeroed"), f("dead_units", "a", "warning")])
    assert bug[0].kind == "gradients_not_zeroed" and all(x.caused_by == "gradients_not_zeroed" for x in bug[1:])
    assert Finding.from_dict(found[1].to_dict()).caused_by == "lr_too_high"


def test_a_crash_that_lasts_counts_even_if_the_layer_partly_recovers():
    """Lesson 10's plain CNN on one thread: the ReLU std crashes to ~0.03 for a stretch, then climbs back
    part of the way. The crash is what happened; the end of the run alone would hide it."""
    from deepscope.diagnose.history import check_activation_crash

    std = np.r_[np.linspace(0.1, 1.4, 40), np.full(40, 0.03), np.linspace(0.03, 0.5, 40)]
    (f,) = check_activation_crash(["act"], np.arange(120), std[:, None])
    assert f.kind == "activation_collapse" and f.evidence["low_std"] == pytest.approx(0.03)
    assert "back to" in f.message
    brief = np.r_[np.linspace(0.1, 1.4, 40), [0.03, 0.03], np.full(78, 1.0)]  # two rows: noise, not a crash
    assert check_activation_crash(["act"], np.arange(120), brief[:, None]) == []


def test_back_at_chance_for_a_stretch_is_divergence_and_the_story_is_told_in_order():
    from deepscope.diagnose.history import check_loss_history

    chance = math.log(10)
    v = list(np.r_[np.linspace(chance, 2.0, 40), [3.3], np.full(60, chance), np.linspace(chance, 2.2, 17)])
    (f,) = check_loss_history(v, n_classes=10)
    assert f.kind == "lr_too_high" and f.evidence["steps_at_chance"] >= 50
    assert "spiked to 3.3 at step 40" in f.message and f"back to {f.evidence['final_loss']:.4g} at the end" in f.message
    assert f.evidence["final_loss"] < chance * 0.97  # partly recovered: the stretch at chance still counts
    # the loss never went down: no "came down, then went back" story, whatever the spike
    early_spike = list(np.r_[[chance, 20.0], np.full(98, 1.9)])
    (g,) = check_loss_history(early_spike, n_classes=10)
    assert "come down" not in g.message and "spiked from" in g.message
    # ending far above chance is not "at chance"
    above = list(np.r_[np.linspace(chance, 2.0, 40), np.full(60, 2.5 * chance)])
    (h,) = check_loss_history(above, n_classes=10)
    assert "chance" not in h.message
