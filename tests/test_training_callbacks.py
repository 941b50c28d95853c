import pytest
import torch
from torch import nn

from deepscope.callback import Callback, CallbackError
from deepscope.callbacks import EarlyStopping, GradClip, MetricsCallback, MixedPrecision, SaveBest
from deepscope.data import DataLoaders, TensorBatches
from deepscope.errors import ConfigError
from deepscope.learner import Learner, TrainStep
from deepscope.weights import load_weights


def make(cbs, lr=0.5, n=64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(model, DataLoaders(TensorBatches(x, y, 16), TensorBatches(x, y, 32), n_classes=3), lr=lr,
                   opt_func=torch.optim.SGD, cbs=[MetricsCallback(), *cbs])


def test_grad_clip_bounds_the_norm_seen_by_the_step():
    seen = []

    class Measure(Callback):
        order = 30  # after GradClip (20)

        def after_backward(self, learn):
            seen.append(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm().item())

    clip = GradClip(0.01, keep_norms=True)
    make([clip, Measure()]).fit(1)
    assert all(n <= 0.01 * (1 + 1e-4) for n in seen)
    assert len(clip.norms) == 4 and all(float(n) > 0.01 for n in clip.norms)  # the raw norms were larger
    with pytest.raises(ValueError):
        GradClip(0)


def test_mixed_precision_uses_bfloat16_on_cpu_and_restores_the_step():
    dtypes = []

    class Watch(Callback):
        def after_pred(self, learn):
            dtypes.append(learn.preds.dtype)

    learn = make([MixedPrecision(), Watch()])
    learn.fit(1)
    assert set(dtypes) == {torch.bfloat16} and type(learn.train_step) is TrainStep
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())


def test_save_best_keeps_the_best_epoch_and_reloads_it(tmp_path):
    saver = SaveBest(tmp_path / "best.safetensors", monitor="valid_loss")
    learn = make([saver], lr=0.3)
    learn.fit(4)
    history = learn.get_cb(MetricsCallback).history
    best_epoch = min(range(4), key=lambda i: history[i]["valid_loss"])
    assert saver.best_epoch == best_epoch and saver.best == pytest.approx(history[best_epoch]["valid_loss"])
    reference = make([])
    load_weights(reference.model, tmp_path / "best.safetensors")
    for a, b in zip(reference.model.parameters(), learn.model.parameters()):
        assert torch.equal(a, b)


def test_early_stopping_stops_after_patience():
    class Worse(Callback):
        order = 20  # after metrics, before the stopper: the loss "gets worse" every epoch

        def after_epoch(self, learn):
            learn.get_cb(MetricsCallback).history[-1]["valid_loss"] = float(learn.epoch)

    stopper = EarlyStopping("valid_loss", patience=2)
    learn = make([Worse(), stopper])
    learn.fit(10)
    assert stopper.stopped_epoch == 2 and len(learn.get_cb(MetricsCallback).history) == 3


def test_monitor_of_a_missing_metric_names_what_exists_before_training():
    learn = make([EarlyStopping("valid_f1")])
    before = learn.model[0].weight.detach().clone()
    with pytest.raises(CallbackError, match=r"before_fit.*no 'valid_f1'.*'valid_accuracy'") as info:
        learn.fit(1)
    assert isinstance(info.value.__cause__, ConfigError)
    assert torch.equal(before, learn.model[0].weight)  # refused before any step
