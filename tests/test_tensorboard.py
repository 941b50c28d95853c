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
from deepscope.errors import ConfigError
from deepscope.learner import Learner
from deepscope.stats import ActivationStats
from deepscope.tensorboard import TensorBoardCallback, latest_layer_stats

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def tiny_learner(cbs, n_batches=5):
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(n_batches)]
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return Learner(model, DataLoaders(train=batches, valid=batches[:2]), lr=0.1, opt_func=torch.optim.SGD, cbs=cbs)


class LossSpy(Callback):
    order = 100

    def __init__(self):
        self.losses, self.lrs = {}, {}

    def after_batch(self, learn):
        if learn.training:
            self.losses[learn.train_iter], self.lrs[learn.train_iter] = learn.loss.item(), learn.lr


def read(log_dir):
    ea = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0})
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
    assert [e.step for e in valid_loss] == [1, 2]
    np.testing.assert_allclose([e.value for e in valid_loss], [r["valid_loss"] for r in metrics.history], rtol=1e-6)
    assert {"epoch/train_loss", "epoch/valid_accuracy"} <= set(ea.Tags()["scalars"])
    assert set(ea.Tags()["histograms"]) == {f"weights/{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert len(ea.Histograms("weights/0.weight")) == 2  # one per epoch
    assert ea.Histograms("weights/2.bias")[-1].histogram_value.num == 3
    stats = act.stats()  # the last recorded step (9) is the one logged at the end of epoch 2
    for i, module in enumerate(stats.modules):
        for key, values in (("mean", stats.act_mean), ("dead", stats.act_dead)):
            logged = ea.Scalars(f"activations/{module}/{key}")
            assert [e.step for e in logged] == [1, 2]
            assert logged[-1].value == pytest.approx(float(values[-1, i]), rel=1e-6)


def test_activation_stats_found_among_callbacks_and_histograms_optional(tmp_path):
    learn = tiny_learner([ActivationStats(), TensorBoardCallback(tmp_path, histograms=False, every=100)])
    learn.fit(1)
    tags = read(tmp_path).Tags()
    assert tags["histograms"] == []
    assert "activations/0/std" in tags["scalars"] and "train/loss" in tags["scalars"]


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
