"""TensorBoardCallback: what it logs reads back with TensorBoard's own reader; the writer always closes."""
from __future__ import annotations

import sys
import numpy as np
import pytest
import torch
from torch import nn

from deepscope.callback import Callback
from deepscope.callbacks import MetricsCallback
from deepscope.data import DataLoaders
from deepscope.diagnose import Diagnose
from deepscope.errors import ConfigError
from deepscope.learner import Learner
from deepscope.stats import ActivationStats
from deepscope.tensorboard import TensorBoardCallback, latest_layer_stats

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def tiny_learner(cbs, n_batches=5, softmax=False):
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(n_batches)]
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), *([nn.Softmax(dim=1)] if softmax else []))
    return Learner(model, DataLoaders(train=batches, valid=batches[:2]), lr=0.1, opt_func=torch.optim.SGD, cbs=cbs)


class LossSpy(Callback):
    order = 100

    def __init__(self):
        self.losses, self.lrs = {}, {}

    def after_batch(self, learn):
        if learn.training:
            self.losses[learn.train_iter], self.lrs[learn.train_iter] = learn.loss.item(), learn.lr


def read(log_dir):
    ea = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_fit_logs_loss_lr_metrics_histograms_and_layer_stats(tmp_path):
    spy, metrics, act = LossSpy(), MetricsCallback(), ActivationStats(every=3)
    learn = tiny_learner([metrics, spy, act, TensorBoardCallback(tmp_path, stats=act, every=2)])
    learn.fit(2)
    ea = read(tmp_path)
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 2, 4, 6, 8]  # 10 training steps, every 2nd
    np.testing.assert_allclose([e.value for e in loss], [spy.losses[e.step] for e in loss], rtol=1e-6)
    assert [e.value for e in ea.Scalars("train/lr")] == pytest.approx([0.1] * 5)
    valid_loss = ea.Scalars("epoch/valid_loss")
    assert [e.step for e in valid_loss] == [5, 10]  # the global steps the two epochs ended on
    np.testing.assert_allclose([e.value for e in valid_loss], [r["valid_loss"] for r in metrics.history], rtol=1e-6)
    assert {"epoch/train_loss", "epoch/valid_accuracy"} <= set(ea.Tags()["scalars"])
    weights = {f"weights/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    stats = act.stats()
    assert set(ea.Tags()["histograms"]) == weights | {f"activations/{m}" for m in stats.modules}
    assert len(ea.Histograms("weights/0.weight")) == 2  # one per epoch
    assert ea.Histograms("weights/2.bias")[-1].histogram_value.num == 3
    # ActivationStats(every=3) recorded steps 0, 3, 6, 9: each the first recorded step of its window of 2
    assert list(stats.steps) == [0, 3, 6, 9]
    for i, module in enumerate(stats.modules):
        for key, values in (("act_mean", stats.act_mean), ("off_fraction", stats.act_dead)):
            logged = ea.Scalars(f"layers/{module}/{key}")
            assert [e.step for e in logged] == [0, 3, 6, 9]
            np.testing.assert_allclose([e.value for e in logged], values[:, i], rtol=1e-6)
        assert [e.step for e in ea.Histograms(f"activations/{module}")] == [0, 3, 6, 9]


def test_activation_stats_found_among_callbacks_and_histograms_optional(tmp_path):
    learn = tiny_learner([ActivationStats(), TensorBoardCallback(tmp_path, histograms=False, every=100)])
    learn.fit(1)
    tags = read(tmp_path).Tags()
    assert tags["histograms"] == []
    assert "layers/0/act_std" in tags["scalars"] and "train/loss" in tags["scalars"]


def test_latest_layer_stats_without_anything_recorded():
    assert latest_layer_stats(object()) == {}
    assert latest_layer_stats(ActivationStats()) == {}  # not fitted yet


def test_writer_closed_when_fit_raises(tmp_path):
    class Boom(Callback):
        order = 95

        def after_batch(self, learn):
            if learn.train_iter == 1:
                self.writer = tb.writer
                raise RuntimeError("boom")

    tb, boom = TensorBoardCallback(tmp_path, every=1), Boom()
    learn = tiny_learner([tb, boom])
    with pytest.raises(Exception, match="boom"):
        learn.fit(1)
    assert tb.writer is None and boom.writer.all_writers is None  # SummaryWriter.close() clears these
    assert [e.step for e in read(tmp_path).Scalars("train/loss")] == [0, 1]  # flushed on close


def test_a_fit_cut_short_still_logs_what_was_recorded(tmp_path):
    from tensorboard.plugins.hparams import metadata

    class Boom(Callback):
        order = 95

        def after_batch(self, learn):
            if learn.train_iter == 3:
                raise RuntimeError("boom")

    act = ActivationStats()
    learn = tiny_learner([act, TensorBoardCallback(tmp_path, stats=act, every=1, hparams={"lr": 0.1}), Boom()])
    with pytest.raises(Exception, match="boom"):
        learn.fit(1)  # no epoch end: the rows are written at the end of the fit
    ea, steps = read(tmp_path), list(act.stats().steps)
    assert len(steps) >= 3 and [e.step for e in ea.Scalars("layers/1/off_fraction")] == steps
    end = metadata.parse_session_end_info_plugin_data(ea.PluginTagToContent("hparams")[metadata.SESSION_END_INFO_TAG])
    assert end.status == 2  # STATUS_FAILURE


def test_missing_tensorboard_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    learn = tiny_learner([TensorBoardCallback(tmp_path)])
    with pytest.raises(Exception, match=r"pip install deepscope\[tensorboard\]") as info:
        learn.fit(1)
    assert isinstance(info.value.__cause__, ConfigError)


def test_every_must_be_positive(tmp_path):
    with pytest.raises(ConfigError):
        TensorBoardCallback(tmp_path, every=0)


def test_a_log_that_cannot_be_written_stops_logging_not_training(tmp_path, capsys):
    from torch import nn

    from deepscope import Learner
    from deepscope.callbacks import MetricsCallback
    from deepscope.data import DataLoaders
    from deepscope.tensorboard import TensorBoardCallback

    (tmp_path / "a-file").write_text("in the way")
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    tb = TensorBoardCallback(tmp_path / "a-file" / "tb", every=1)
    learn = Learner(nn.Linear(4, 2), DataLoaders(batches, batches[:1]), cbs=[MetricsCallback(), tb])
    learn.fit(2)
    assert isinstance(tb.failed, OSError)
    assert "TensorBoard logging stopped" in capsys.readouterr().err
    assert len(learn.get_cb(MetricsCallback).history) == 2, "training went on"


# --- what deepscope records, per step -----------------------------------------------------------------------
def test_layer_scalars_every_recorded_step_equal_the_stats(tmp_path):
    act = ActivationStats()  # every step
    learn = tiny_learner([MetricsCallback(), act, TensorBoardCallback(tmp_path, stats=act, every=1)])
    learn.fit(1)  # one epoch: one point per step, not one per epoch
    ea, stats = read(tmp_path), act.stats()
    assert list(stats.steps) == [0, 1, 2, 3, 4]
    for fields, names in (({"act_mean": stats.act_mean, "act_std": stats.act_std, "off_fraction": stats.act_dead,
                            "grad_norm": stats.grad_norm}, stats.modules),
                          ({"param_grad_norm": stats.param_grad_norm, "update_ratio": stats.update_ratio},
                           stats.param_modules)):
        assert names
        for i, module in enumerate(names):
            for key, values in fields.items():
                logged = ea.Scalars(f"layers/{module}/{key}")
                assert [e.step for e in logged] == [0, 1, 2, 3, 4], (module, key)
                np.testing.assert_allclose([e.value for e in logged], values[:, i].astype(np.float32), rtol=1e-6)
    assert stats.param_modules == ["0", "2"]
    assert not [t for t in ea.Tags()["scalars"] if t.endswith("/nonfinite")]  # all finite: no such scalar


def test_activation_histograms_hold_the_recorded_bins(tmp_path):
    act = ActivationStats(hist_bins=12, hist_range=(0.0, 3.0))
    learn = tiny_learner([act, TensorBoardCallback(tmp_path, stats=act, every=1)])
    learn.fit(1)
    ea, stats = read(tmp_path), act.stats()
    for i, module in enumerate(stats.modules):
        logged = ea.Histograms(f"activations/{module}")
        assert [e.step for e in logged] == list(stats.steps)
        for r, event in enumerate(logged):
            h = event.histogram_value
            assert len(h.bucket) == len(h.bucket_limit) == 12
            np.testing.assert_allclose(h.bucket_limit, stats.hist_edges[1:])
            np.testing.assert_allclose(h.bucket, stats.act_hist[r, i])
            assert h.num == pytest.approx(float(stats.act_hist[r, i].sum())) and h.num > 0
            assert (h.min, h.max) == (0.0, 3.0)


def test_every_thins_the_layer_rows_and_the_loss_alike(tmp_path):
    act = ActivationStats()
    learn = tiny_learner([act, TensorBoardCallback(tmp_path, stats=act, every=2)], n_batches=7)
    learn.fit(1)
    ea = read(tmp_path)
    assert [e.step for e in ea.Scalars("layers/0/act_std")] == [0, 2, 4, 6]
    assert [e.step for e in ea.Histograms("activations/1")] == [0, 2, 4, 6]
    assert [e.step for e in ea.Scalars("train/loss")] == [0, 2, 4, 6]


def test_nonfinite_values_are_left_out_and_counted(tmp_path):
    class Spoiled(Callback):  # an ActivationStats whose step 2 has a NaN mean and an infinite gradient norm
        def __init__(self, inner):
            self.inner = inner

        def stats(self):
            s = self.inner.stats()
            s.act_mean[2, 0], s.grad_norm[2, 0] = np.nan, np.inf
            return s

    act = ActivationStats()
    learn = tiny_learner([act, TensorBoardCallback(tmp_path, stats=Spoiled(act), every=1)])
    learn.fit(1)
    ea = read(tmp_path)
    assert [e.step for e in ea.Scalars("layers/0/act_mean")] == [0, 1, 3, 4]
    assert [e.step for e in ea.Scalars("layers/0/grad_norm")] == [0, 1, 3, 4]
    assert [e.step for e in ea.Scalars("layers/0/act_std")] == [0, 1, 2, 3, 4]
    assert [(e.step, e.value) for e in ea.Scalars("layers/0/nonfinite")] == [(2, 2.0)]
    assert "layers/1/nonfinite" not in ea.Tags()["scalars"]


def test_findings_written_as_text_causes_first(tmp_path):
    diag = Diagnose(replay=False)
    learn = tiny_learner([MetricsCallback(), ActivationStats(), diag, TensorBoardCallback(tmp_path, every=1)],
                         softmax=True)
    learn.fit(1)
    assert diag.findings and diag.findings[0].kind == "softmax_before_cross_entropy"
    ea = read(tmp_path)
    events = ea.Tensors("diagnosis/text_summary")
    assert [e.step for e in events] == [5]  # at the end of the fit
    text = events[0].tensor_proto.string_val[0].decode()
    lines = text.splitlines()
    assert lines[0].startswith("- **ERROR** **softmax_before_cross_entropy**")
    assert len([ln for ln in lines if ln.lstrip().startswith("- ")]) == len(diag.findings)
    assert lines[-1] == diag.analysis.summary()


def test_no_diagnose_no_text(tmp_path):
    tiny_learner([TensorBoardCallback(tmp_path, every=1)]).fit(1)
    assert read(tmp_path).Tags()["tensors"] == []


def test_hparams_written_once_into_the_log_folder(tmp_path):
    from tensorboard.plugins.hparams import metadata

    metrics = MetricsCallback()
    hparams = {"lr": 0.1, "epochs": 2, "opt": "sgd", "shuffle": True, "nfs": [4, 6], "out": None,
               "seed": np.int64(7)}
    learn = tiny_learner([metrics, TensorBoardCallback(tmp_path, every=1, hparams=hparams)])
    learn.fit(2)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-run
    ea = read(tmp_path)
    content = ea.PluginTagToContent("hparams")
    assert set(content) == {metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG}
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values == {"lr": 0.1, "epochs": 2.0, "opt": "sgd", "shuffle": True, "nfs": "[4, 6]", "out": "None",
                      "seed": 7.0}
    assert start.hparams["shuffle"].WhichOneof("kind") == "bool_value"
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert {h.name for h in experiment.hparam_infos} == set(hparams)
    metric_tags = [m.name.tag for m in experiment.metric_infos]
    assert metric_tags == ["epoch/valid_loss", "epoch/valid_accuracy"]
    for tag, key in zip(metric_tags, ("valid_loss", "valid_accuracy")):  # the dashboard shows the last value
        assert ea.Scalars(tag)[-1].value == pytest.approx(metrics.history[-1][key], rel=1e-6)
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS
    assert len(ea.Tensors(metadata.SESSION_START_INFO_TAG)) == 1


def test_hparams_must_be_a_dict(tmp_path):
    with pytest.raises(ConfigError):
        TensorBoardCallback(tmp_path, hparams=[("lr", 0.1)])


def test_a_second_fit_continues_the_steps(tmp_path):
    from tensorboard.plugins.hparams import metadata

    act, diag = ActivationStats(), Diagnose(replay=False)
    tb = TensorBoardCallback(tmp_path, stats=act, every=1, hparams={"lr": 0.1})
    learn = tiny_learner([MetricsCallback(), act, diag, tb])
    learn.fit(1)
    first = act.stats()
    learn.fit(2)
    second = act.stats()  # a new record: its steps restart at 0
    assert list(second.steps) == list(range(10)) and tb.step_offset == 5 and tb.epoch_offset == 1
    ea = read(tmp_path)
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(15))
    logged = ea.Scalars("layers/2/act_std")
    assert [e.step for e in logged] == list(range(15))
    np.testing.assert_allclose([e.value for e in logged], np.concatenate([first.act_std[:, 2], second.act_std[:, 2]]),
                               rtol=1e-6)
    assert [e.step for e in ea.Histograms("activations/0")] == list(range(15))
    # epoch metrics at the global step each epoch ended on: the same x axis as the per-step tags
    assert [e.step for e in ea.Scalars("epoch/valid_loss")] == [5, 10, 15]
    assert [e.value for e in ea.Scalars("epoch/epoch")] == [1, 2, 3]
    assert [e.step for e in ea.Histograms("weights/0.weight")] == [5, 10, 15]
    assert [e.step for e in ea.Tensors("diagnosis/text_summary")] == [5, 15]
    assert len(ea.Tensors(metadata.SESSION_START_INFO_TAG)) == 1  # the hyper-parameters once


def test_rows_read_before_activation_stats_merges_them(tmp_path):
    act = ActivationStats(recent=4, max_rows=6, flush_every=2)  # keeps 4 rows exactly, merges older ones
    learn = tiny_learner([act, TensorBoardCallback(tmp_path, stats=act, every=1)], n_batches=14)
    learn.fit(1)
    assert len(act.stats().steps) < 14  # merged by the epoch's end
    logged = read(tmp_path).Scalars("layers/0/act_mean")
    assert [e.step for e in logged] == list(range(14))  # read every 2 steps, before any row was merged
