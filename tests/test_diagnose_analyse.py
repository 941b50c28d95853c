"""Analysis as pure functions: made-up records in, findings out (no model, no training)."""
import math

from deepscope.diagnose import LayerWeight, ModuleRecord, ProbeRecord, SetupRecord, analyse_probe, analyse_setup
from deepscope.diagnose.analyse import (
    check_activation_scale, check_dead_units, check_learning_rate, check_no_gradient, check_nonfinite, check_saturation,
)
from deepscope.diagnose.setup_checks import (
    check_batchnorm_batch, check_inputs, check_loss_input, check_symmetric_init, check_targets,
)
from deepscope.diagnose.thresholds import (
    ACT_COLLAPSE_RATIO, ACT_EXPLOSION_RATIO, BN_SMALL_BATCH, LR_LOW_UPDATE_RATIO, SATURATED_FRACTION,
)


def kinds(findings):
    return [(f.kind, f.module, f.severity) for f in findings]


def module(name, order, stds=(1.0,), active=(0.5, 0.5), saturated=(), type_="ReLU"):
    return ModuleRecord(name, type_, order, steps=list(range(len(stds))), means=[0.0] * len(stds), stds=list(stds),
                        saturated=list(saturated), active=list(active), n_active=1)


def healthy_probe():
    losses = [(i, 1.4 - 0.02 * i) for i in range(30)]
    mods = {"0": module("0", 0, type_="Linear"), "1": module("1", 1), "2": module("2", 2, type_="Linear")}
    return ProbeRecord(steps=30, input_std=1.0, batch_sizes=[32] * 30, losses=losses, modules=mods, output_module="2",
                       params={"0.weight": "0", "2.weight": "2"}, grad_seen={"0.weight": True, "2.weight": True},
                       grad_nonzero={"0.weight": True, "2.weight": True},
                       update_ratios={"0.weight": [3e-3] * 30, "2.weight": [3e-3] * 30})


def healthy_setup():
    return SetupRecord(loss_kind="cross_entropy", batch_size=32, x_mean=0.01, x_std=0.99, y_dtype="int64",
                       y_shape=(32,), y_min=0, y_max=3, out_shape=(32, 4), out_min=-2.0, out_max=2.5,
                       out_row_sum_dev=1.7, out_row_lse_dev=1.9,
                       weights=[LayerWeight("0", (8, 16), False, 0.1), LayerWeight("2", (4, 8), False, -0.2)],
                       batchnorms=["1"])


def test_healthy_records_give_no_findings():
    assert analyse_probe(healthy_probe()) == []
    assert analyse_setup(healthy_setup()) == []


def test_nonfinite_findings_name_the_producer():
    rec = healthy_probe()
    rec.nonfinite_forward = {"module": "1", "step": 3, "data": False}
    rec.nonfinite_backward = {"module": "2", "step": 0, "how": "backward hooks"}
    rec.nonfinite_loss = {"step": 5, "loss": math.inf}
    rec.saved = "/tmp/run/nonfinite_batch.pt"
    found = check_nonfinite(rec)
    assert kinds(found) == [("nonfinite_forward", "1", "error"), ("nonfinite_backward", "2", "error"),
                            ("nonfinite_loss", "", "error")]
    assert "step 3" in found[0].message and "/tmp/run/nonfinite_batch.pt" in found[0].message
    rec.nonfinite_forward = {"module": "", "step": 0, "data": True}
    assert "input batch" in check_nonfinite(rec)[0].message


def test_no_gradient_groups_parameters_by_module():
    rec = healthy_probe()
    rec.grad_seen = {"0.weight": True, "2.weight": False}
    assert kinds(check_no_gradient(rec)) == [("no_gradient", "2", "warning")]
    rec.grad_seen = {"0.weight": False, "2.weight": False}  # no backward finished: nothing to conclude
    assert check_no_gradient(rec) == []


def test_dead_units_fraction_and_chain_reported_once():
    rec = healthy_probe()
    rec.modules["1"].active = [0.0] * 3 + [0.5]  # 3 of 4 channels never on
    rec.modules["1b"] = module("1b", 1.5, active=[0.0] * 3 + [0.5], type_="Dropout")  # passes the same dead units on
    (f,) = check_dead_units(rec)
    assert (f.kind, f.module, f.severity) == ("dead_units", "1", "warning") and f.evidence["dead_fraction"] == 0.75
    rec.modules["1"].active = [0.0] * 4
    assert check_dead_units(rec)[0].severity == "error"
    rec.modules["1"].active = [0.0] + [0.5] * 9  # 10%: below the layer threshold
    rec.modules.pop("1b")
    assert check_dead_units(rec) == []


def test_activation_explosion_and_collapse_through_depth():
    rec = healthy_probe()
    rec.modules["1"].stds = [ACT_EXPLOSION_RATIO * 3]
    assert kinds(check_activation_scale(rec)) == [("activation_explosion", "1", "warning")]
    rec.modules["1"].stds = [ACT_COLLAPSE_RATIO / 3]
    assert kinds(check_activation_scale(rec)) == [("activation_collapse", "1", "warning")]
    rec.modules["2"].stds = [ACT_COLLAPSE_RATIO / 3]  # the model's output (logits) may be small: not flagged
    rec.modules["1"].stds = [1.0]
    assert check_activation_scale(rec) == []


def test_activation_drift_over_time():
    rec = healthy_probe()
    rec.modules["1"].stds = [1.0, 10.0, 100.0, 1000.0]
    assert kinds(check_activation_scale(rec)) == [("activation_explosion", "1", "warning")]
    rec.modules["1"].stds = [1.0, 0.1, 0.01, 0.001]
    assert kinds(check_activation_scale(rec)) == [("activation_collapse", "1", "warning")]


def test_saturation():
    rec = healthy_probe()
    rec.modules["1"].saturated = [SATURATED_FRACTION + 0.3] * 5
    assert kinds(check_saturation(rec)) == [("saturation", "1", "warning")]
    rec.modules["1"].saturated = [0.01] * 5
    assert check_saturation(rec) == []


def test_learning_rate_too_high_rising_spiking_and_diverging():
    rec = healthy_probe()
    rec.losses = [(i, 1.4 + 0.05 * i) for i in range(30)]
    assert kinds(check_learning_rate(rec)) == [("lr_too_high", "", "error")]
    rec.losses = [(i, 1.4 + 0.015 * i) for i in range(30)]  # +24% between the quarters: a warning
    assert kinds(check_learning_rate(rec)) == [("lr_too_high", "", "warning")]
    rec.losses = [(0, 1.4), (1, 50.0)] + [(i, 1.3) for i in range(2, 30)]
    assert kinds(check_learning_rate(rec)) == [("lr_too_high", "", "error")]
    rec.losses = [(0, 1.4), (1, 3.0), (2, 9.0), (3, math.nan)]
    assert "became NaN" in check_learning_rate(rec)[0].message


def test_learning_rate_too_low_needs_flat_loss_and_tiny_updates():
    rec = healthy_probe()
    rec.losses = [(i, 1.4) for i in range(30)]
    rec.update_ratios = {"0.weight": [LR_LOW_UPDATE_RATIO / 100] * 30, "2.weight": [LR_LOW_UPDATE_RATIO / 100] * 30}
    assert kinds(check_learning_rate(rec)) == [("lr_too_low", "", "warning")]
    rec.update_ratios = {"0.weight": [3e-3] * 30, "2.weight": [3e-3] * 30}  # flat but moving: not the lr
    assert check_learning_rate(rec) == []
    rec.update_ratios = {"0.weight": [1e-7] * 30, "2.weight": [1e-7] * 30}
    rec.losses = [(i, 1.4 - 0.02 * i) for i in range(30)]  # learning anyway
    assert check_learning_rate(rec) == []


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
    rec = healthy_probe()
    rec.error = {"where": "forward", "type": "RuntimeError", "message": "mat1 and mat2 shapes cannot be multiplied",
                 "step": 0}
    (f,) = [f for f in analyse_probe(rec) if f.kind == "exception"]
    assert f.severity == "error" and "RuntimeError" in f.message and "mat1 and mat2" in f.message
