"""Analysis as pure functions: made-up records in, findings out (no model, no training)."""
import math

import numpy as np

from deepscope.diagnose import LayerWeight, Record, SetupRecord, analyse_run, analyse_setup
from deepscope.diagnose.history import check_early_rise, check_lr_too_low
from deepscope.diagnose.modules import (
    check_activation_scale, check_dead_units, check_no_gradient, check_nonfinite_counts, check_saturation,
)
from deepscope.diagnose.setup_checks import (
    check_batchnorm_batch, check_inputs, check_loss_input, check_symmetric_init, check_targets,
)
from deepscope.diagnose.thresholds import (
    ACT_COLLAPSE_RATIO, ACT_EXPLOSION_RATIO, BN_SMALL_BATCH, LR_LOW_UPDATE_RATIO, SATURATED_FRACTION,
)
from deepscope.stats import Stats


def kinds(findings):
    return [(f.kind, f.module, f.severity) for f in findings]


MODULES = ["0", "1", "2"]            # Linear, ReLU, Linear (the output)
RULES = ["zero: |a| <= 0.001", "floor: at the floor 0 (within 0.001)", "zero: |a| <= 0.001"]


def make_stats(T=30, std=1.0, dead=0.5, rules=RULES, census=None):
    """A healthy recorded run of T steps of the 3 modules; arrays are made-up (T, M) / (T, P) values."""
    M, P = len(MODULES), 2
    full = lambda v, n=M: np.full((T, n), v, dtype=np.float32)  # noqa: E731
    census = {"1": {"units": 8, "dead": 0.0, "first_dead": 0.0, "steps": [0, T - 1], "censuses": T,
                    "rule": "at the floor 0"}} if census is None else census
    return Stats(modules=list(MODULES), steps=np.arange(T), weights=np.ones(T, dtype=np.int64),
                 act_mean=full(0.0), act_std=full(std), act_min=full(-1.0), act_max=full(1.0), act_dead=full(dead),
                 act_nonfinite=full(0.0), act_hist=np.zeros((T, M, 4), np.float32), hist_edges=np.linspace(0, 1, 5),
                 grad_mean=full(0.0), grad_std=full(0.1), grad_norm=full(0.1), grad_nonfinite=full(0.0),
                 param_modules=["0", "2"], weight_norm=full(1.0, P), param_grad_norm=full(0.1, P),
                 update_ratio=full(3e-3, P), dead_threshold=1e-3, dead_rules=list(rules),
                 structure={"output_module": "2", "input_std": 1.0, "order": list(MODULES),
                            "census": {"every": 1, "window": 5, "modules": census}},
                 observations={"updates": T, "eval_updates": 0, "eval_modules": [], "not_in_optimizer": [],
                               "gradient_checks": T - 1, "stale_gradients": 0})


def healthy_losses(T=30):
    return [1.4 - 0.02 * i for i in range(T)]


def healthy_setup():
    return SetupRecord(loss_kind="cross_entropy", batch_size=32, x_mean=0.01, x_std=0.99, y_dtype="int64",
                       y_shape=(32,), y_min=0, y_max=3, out_shape=(32, 4), out_min=-2.0, out_max=2.5,
                       out_row_sum_dev=1.7, out_row_lse_dev=1.9,
                       weights=[LayerWeight("0", (8, 16), False, 0.1), LayerWeight("2", (4, 8), False, -0.2)],
                       batchnorms=["1"])


def test_healthy_records_give_no_findings_and_say_what_ran():
    analysis = analyse_run(Record(healthy_losses(), make_stats(), n_classes=4, setup=healthy_setup()))
    assert analysis.findings == []
    assert analysis.steps == 30 and "set-up" in analysis.ran[0]
    assert analysis.summary().startswith(f"{len(analysis.ran)} checks on 30 steps: no problems found. Not checked: ")
    assert analyse_setup(healthy_setup()) == []
    bare = analyse_run(Record(healthy_losses()))  # losses only: the statistics checks say why they did not run
    assert ("saturated sigmoid/tanh", "no statistics were recorded") in bare.skipped


def test_nonfinite_counts_name_the_first_module_in_call_order():
    stats = make_stats()
    stats.act_nonfinite[5:, 1:] = 3.0  # from step 5, the ReLU and everything after it
    stats.structure["order"] = ["0", "1", "2"]
    (f,) = check_nonfinite_counts(stats, healthy_losses())
    assert kinds([f]) == [("nonfinite_forward", "1", "error")] and f.evidence["step"] == 5
    stats.structure["order"] = ["2", "1", "0"]  # ran in another order than registered: the first to run
    assert check_nonfinite_counts(stats, healthy_losses())[0].module == "2"
    clean = make_stats()
    clean.grad_nonfinite[7:, :2] = 1.0  # finite outputs, NaN output gradients of 0 and 1: made after module 1
    (b,) = check_nonfinite_counts(clean, healthy_losses())
    assert kinds([b]) == [("nonfinite_backward", "1", "error")]
    losses = healthy_losses()
    losses[7] = math.inf  # ...unless the loss was non-finite first: then its gradient carried it
    assert kinds(check_nonfinite_counts(clean, losses)) == [("nonfinite_loss", "", "error")]
    assert check_nonfinite_counts(make_stats(), healthy_losses()) == []


def test_replayed_nonfinite_finding_replaces_the_estimate():
    from deepscope.diagnose import Finding

    stats = make_stats()
    stats.act_nonfinite[5:, 2] = 1.0
    exact = Finding("nonfinite_forward", "1", "error", "replayed", "", {"source": "replay"})
    found = analyse_run(Record(healthy_losses(), stats, replay=[exact])).findings
    assert [(f.kind, f.module) for f in found if f.kind.startswith("nonfinite")] == [("nonfinite_forward", "1")]


def test_no_gradient_by_module():
    stats = make_stats()
    stats.param_grad_norm[:, 1] = np.nan
    assert kinds(check_no_gradient(stats)) == [("no_gradient", "2", "warning")]
    stats.param_grad_norm[:, :] = np.nan  # no backward finished: nothing to conclude
    assert check_no_gradient(stats) == []


def test_dead_units_from_the_census():
    census = {"1": {"units": 8, "dead": 0.75, "first_dead": 0.0, "steps": [20, 29], "censuses": 30, "rule": "at 0"}}
    (f,) = check_dead_units(make_stats(census=census))
    assert (f.kind, f.module, f.severity) == ("dead_units", "1", "warning") and f.evidence["dead_fraction"] == 0.75
    assert "0% at the start" in f.message
    census["1"]["dead"] = 1.0
    assert check_dead_units(make_stats(census=census))[0].severity == "error"
    census["1"]["dead"] = 0.1  # below the layer threshold
    assert check_dead_units(make_stats(census=census)) == []


def test_activation_explosion_and_collapse_through_depth():
    stats = make_stats()
    stats.act_std[:, 1] = ACT_EXPLOSION_RATIO * 3
    assert kinds(check_activation_scale(stats)) == [("activation_explosion", "1", "warning")]
    stats.act_std[:, 1] = ACT_COLLAPSE_RATIO / 3
    assert kinds(check_activation_scale(stats)) == [("activation_collapse", "1", "warning")]
    stats.act_std[:, 1] = 1.0
    stats.act_std[:, 2] = ACT_COLLAPSE_RATIO / 3  # the model's output (logits) may be small: not flagged
    assert check_activation_scale(stats) == []
    stats.structure["input_std"] = 1000.0  # judged against the input's own scale
    assert kinds(check_activation_scale(stats)) == [("activation_collapse", "0", "warning")]


def test_activation_growth_over_time():
    stats = make_stats()
    stats.act_std[:, 1] = np.geomspace(1.0, 1e4, 30)
    assert kinds(check_activation_scale(stats)) == [("activation_explosion", "1", "warning")]


def test_saturation_of_saturating_activations_only():
    rules = [RULES[0], "saturating: within 0.02 of -1 or 1 (saturated)", RULES[2]]
    stats = make_stats(rules=rules, dead=SATURATED_FRACTION + 0.3)
    assert kinds(check_saturation(stats)) == [("saturation", "1", "warning")]
    assert check_saturation(make_stats(rules=rules, dead=0.01)) == []
    assert check_saturation(make_stats(dead=0.9)) == []  # a ReLU mostly off is not saturated (dead_units says)
    out = make_stats(rules=[RULES[0], RULES[1], rules[1]], dead=0.9)
    assert check_saturation(out) == []  # the model's own output (a sigmoid for BCE) is meant to be near 0 or 1


def test_learning_rate_too_high_rising_spiking_and_diverging():
    assert kinds(check_early_rise([1.4 + 0.1 * i for i in range(30)])) == [("lr_too_high", "", "error")]  # 2.3x
    assert kinds(check_early_rise([1.4 + 0.05 * i for i in range(30)])) == [("lr_too_high", "", "warning")]
    assert kinds(check_early_rise([1.4 + 0.015 * i for i in range(30)])) == [("lr_too_high", "", "warning")]
    assert "became NaN" in check_early_rise([1.4, 3.0, 9.0, math.nan])[0].message
    assert check_early_rise(healthy_losses()) == []
    spiked = analyse_run(Record([1.4, 50.0] + [1.3] * 28, make_stats())).findings
    assert kinds(spiked) == [("lr_too_high", "", "error")]


def test_learning_rate_too_low_needs_flat_loss_and_tiny_updates():
    flat = [1.4] * 30
    tiny = np.full((30, 2), LR_LOW_UPDATE_RATIO / 100)
    assert kinds(check_lr_too_low(flat, tiny)) == [("lr_too_low", "", "warning")]
    assert check_lr_too_low(flat, np.full((30, 2), 3e-3)) == []  # flat but moving: not the lr
    assert check_lr_too_low(healthy_losses(), np.full((30, 2), 1e-7)) == []  # learning anyway


def test_target_checks():
    rec = healthy_setup()
    rec.y_dtype = "float32"
    assert kinds(check_targets(rec)) == [("target_mismatch", "", "error")]
    rec.y_shape = (32, 4)  # soft targets of the output's shape are valid for cross_entropy
    assert check_targets(rec) == []
    rec = healthy_setup()
    rec.y_max = 9
    assert "0..3" in check_targets(rec)[0].message
    rec = healthy_setup()
    rec.y_shape = (32, 1)
    assert kinds(check_targets(rec)) == [("target_mismatch", "", "error")]
    rec = healthy_setup()
    rec.y_min = -100  # cross_entropy's ignore_index
    assert check_targets(rec) == []
    rec = healthy_setup()
    rec.loss_kind, rec.out_shape, rec.y_shape, rec.y_dtype = "mse", (32, 1), (32,), "float32"
    assert "broadcasts" in check_targets(rec)[0].message


def test_loss_input_checks():
    rec = healthy_setup()
    rec.out_min, rec.out_max, rec.out_row_sum_dev, rec.out_row_lse_dev = 0.01, 0.9, 1e-7, 1.2
    assert kinds(check_loss_input(rec)) == [("softmax_before_cross_entropy", "", "error")]
    rec.loss_kind = "nll"
    assert kinds(check_loss_input(rec)) == [("probabilities_to_nll", "", "error")]
    rec = healthy_setup()
    rec.loss_kind = "nll"  # raw logits to nll
    assert kinds(check_loss_input(rec)) == [("probabilities_to_nll", "", "error")]
    rec.out_min, rec.out_max, rec.out_row_sum_dev, rec.out_row_lse_dev = -5.0, -0.01, 0.99, 1e-7
    assert check_loss_input(rec) == []  # log-probabilities: what nll_loss expects
    rec.loss_kind = "cross_entropy"
    assert kinds(check_loss_input(rec)) == [("softmax_before_cross_entropy", "", "info")]


def test_symmetric_init_one_layer_vs_two_in_a_row():
    w = lambda name, const, value=0.0: LayerWeight(name, (8, 8), const, value)
    two = check_symmetric_init([w("0", True), w("2", True), w("4", False, 0.3)])
    assert kinds(two) == [("symmetric_init", "0", "error"), ("symmetric_init", "2", "error")]
    assert "fatal" in two[0].message and "no gradient" in two[0].message
    one = check_symmetric_init([w("0", False, 0.3), w("2", True, 0.5), w("4", False, 0.3)])
    assert kinds(one) == [("symmetric_init", "2", "warning")]
    last = check_symmetric_init([w("0", False, 0.3), w("2", True)])
    assert kinds(last) == [("symmetric_init", "2", "info")]
    stalled = check_symmetric_init([w("0", True), w("2", False, 0.3)], grad_nonzero={"0.weight": False})
    assert kinds(stalled) == [("symmetric_init", "0", "error")]


def test_batchnorm_batch_size():
    assert check_batchnorm_batch(["bn"], 64) == []
    assert check_batchnorm_batch([], 1) == []
    assert kinds(check_batchnorm_batch(["bn"], BN_SMALL_BATCH - 1)) == [("batchnorm_small_batch", "bn", "warning")]
    assert kinds(check_batchnorm_batch(["bn"], 1)) == [("batchnorm_small_batch", "bn", "error")]
    (f,) = check_batchnorm_batch(["bn"], 64, last_batch_size=1)
    assert f.severity == "error" and "last batch" in f.message


def test_input_normalisation():
    rec = healthy_setup()
    assert check_inputs(rec) == []
    rec.x_mean, rec.x_std = 73.0, 90.0  # raw pixels
    assert kinds(check_inputs(rec)) == [("input_not_normalized", "", "warning")]
    rec.x_mean, rec.x_std = 0.29, 0.35  # pixels in [0, 1]: acceptable
    assert check_inputs(rec) == []
    rec.x_float, rec.x_mean = False, 500.0  # token ids are not normalised, and need not be
    assert check_inputs(rec) == []


def test_recorded_exception_becomes_a_finding():
    error = {"where": "forward", "type": "RuntimeError", "message": "mat1 and mat2 shapes cannot be multiplied",
             "step": 0}
    (f,) = [f for f in analyse_run(Record([], error=error)).findings if f.kind == "exception"]
    assert f.severity == "error" and "RuntimeError" in f.message and "mat1 and mat2" in f.message
