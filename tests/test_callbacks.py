import io
import math

import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassF1Score

from deepscope.callback import Callback
from deepscope.callbacks import (
    DeviceCallback, LimitBatches, MetricsCallback, OneCycle, ParamScheduler, ProgressCallback, Recorder,
    SingleBatch, combine_scheds, default_device, sched_cos, sched_lin,
)
from deepscope.callbacks.schedule import one_cycle_lr
from deepscope.data import DataLoaders, TensorBatches
from deepscope.learner import Learner


def data(n=40, n_in=5, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = torch.randint(0, n_out, (n,), generator=g)
    return x, y


def make(cbs, n_train=40, n_valid=24, bs=8, opt_func=torch.optim.SGD, lr=0.1):
    xt, yt = data(n_train)
    xv, yv = data(n_valid, seed=1)
    dls = DataLoaders(TensorBatches(xt, yt, bs, shuffle=True), TensorBatches(xv, yv, bs), n_classes=3)
    return Learner(nn.Linear(5, 3), dls, lr=lr, opt_func=opt_func, cbs=cbs)


def test_metrics_match_a_direct_computation():
    metrics = MetricsCallback()
    learn = make([metrics])
    learn.fit(2)
    assert len(metrics.history) == 2 and set(metrics.history[0]) == {"epoch", "train_loss", "valid_loss", "valid_accuracy", "seconds"}
    xv, yv = learn.dls.valid.x, learn.dls.valid.y
    with torch.no_grad():
        preds = learn.model(xv)
    assert metrics.history[-1]["valid_loss"] == pytest.approx(nn.functional.cross_entropy(preds, yv).item(), rel=1e-5)
    assert metrics.history[-1]["valid_accuracy"] == pytest.approx((preds.argmax(1) == yv).float().mean().item())
    assert metrics.history[-1]["epoch"] == 2 and metrics.history[-1]["seconds"] > 0


def test_train_loss_is_the_batch_size_weighted_mean():
    metrics, recorder = MetricsCallback(), Recorder()
    learn = make([metrics, recorder], n_train=20, bs=8)  # batches of 8, 8, 4
    learn.fit(1)
    sizes = [8, 8, 4]
    expected = sum(l * s for l, s in zip(recorder.losses, sizes)) / 20
    assert metrics.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_any_torchmetrics_metric():
    metrics = MetricsCallback({"f1": MulticlassF1Score(3, average="macro")})
    make([metrics]).fit(1)
    assert 0.0 <= metrics.history[0]["valid_f1"] <= 1.0


def test_recorder_keeps_loss_and_lr_per_training_batch():
    recorder = Recorder()
    learn = make([recorder], n_train=40, bs=8, opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    learn.fit(2)
    assert len(recorder.losses) == 10 and len(recorder.lrs) == 10 and recorder.moms == [0.9] * 10
    assert all(isinstance(v, float) and math.isfinite(v) for v in recorder.losses)


def test_limit_batches_and_single_batch():
    counts = {"train": 0, "valid": 0}

    class Count(Callback):
        def after_batch(self, learn):
            counts["train" if learn.training else "valid"] += 1

    make([LimitBatches(2, 1), Count()]).fit(2)
    assert counts == {"train": 4, "valid": 2}
    counts.update(train=0, valid=0)
    make([SingleBatch(), Count()]).fit(3)
    assert counts == {"train": 1, "valid": 0}


def test_limit_batches_rejects_non_positive():
    with pytest.raises(ValueError, match="positive"):
        LimitBatches(0)


def test_schedule_functions():
    assert sched_lin(1, 3)(0.5) == 2
    assert sched_cos(1, 3)(0) == pytest.approx(1) and sched_cos(1, 3)(1) == pytest.approx(3)
    two = combine_scheds([0.3, 0.7], [sched_lin(0, 1), sched_lin(1, 0)])
    assert two(0) == 0 and two(0.3) == pytest.approx(1) and two(1) == pytest.approx(0)
    with pytest.raises(ValueError):
        combine_scheds([0.5, 0.6], [sched_lin(0, 1), sched_lin(1, 0)])


def test_one_cycle_sets_lr_and_momentum_then_restores_them():
    recorder = Recorder()
    learn = make([OneCycle(1.0, pct_start=0.25), recorder], n_train=80, bs=8,
                 opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    learn.fit(2)  # 20 steps
    lrs, moms = recorder.lrs, recorder.moms
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(1.0 / 25) and 4 <= peak <= 5 and max(lrs) == pytest.approx(1.0, rel=0.05)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1])) and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85, abs=0.01)
    assert learn.opt.param_groups[0]["lr"] == 0.1 and learn.opt.param_groups[0]["momentum"] == 0.9  # restored


def test_one_cycle_drives_adam_betas():
    recorder = Recorder()
    learn = make([OneCycle(0.01), recorder], opt_func=torch.optim.AdamW)
    learn.fit(1)
    assert recorder.moms[0] == pytest.approx(0.95) and learn.opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_param_scheduler_leaves_momentum_of_plain_sgd_alone():
    learn = make([ParamScheduler({"lr": sched_lin(0.1, 0.0), "momentum": sched_lin(0.9, 0.9)})])
    seen = []

    class Watch(Callback):
        order = 6

        def before_batch(self, learn):
            if learn.training:
                seen.append(learn.opt.param_groups[0]["momentum"])

    learn.fit(1, cbs=[Watch()])
    assert seen and all(m == 0 for m in seen)
    assert one_cycle_lr(1.0)(1.0) == pytest.approx(1e-4)


def test_device_callback_moves_model_and_data():
    assert default_device("cpu") == torch.device("cpu")
    assert default_device().type in {"cpu", "cuda", "mps"}
    learn = make([DeviceCallback("cpu", channels_last=False)])
    learn.fit(1)
    assert next(learn.model.parameters()).device.type == "cpu"


def test_device_callback_channels_last_keeps_results():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    conv(x)
    dls = DataLoaders(TensorBatches(x, y, 8), TensorBatches(x, y, 8), n_classes=3)
    metrics = MetricsCallback()
    Learner(conv, dls, lr=0.0, opt_func=torch.optim.SGD, cbs=[DeviceCallback("cpu", channels_last=True), metrics]).fit(1)
    assert dls.train.x.is_contiguous(memory_format=torch.channels_last)
    expected = nn.functional.cross_entropy(conv(x.contiguous()), y).item()
    assert metrics.history[0]["valid_loss"] == pytest.approx(expected, rel=1e-5)


def test_progress_prints_one_row_per_epoch():
    out = io.StringIO()
    make([MetricsCallback(), ProgressCallback(bars=False, file=out)]).fit(3)
    lines = out.getvalue().strip().splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "valid_loss", "valid_accuracy", "seconds"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]


def test_progress_bar_counts_batches():
    out = io.StringIO()
    make([MetricsCallback(), ProgressCallback(bars=True, file=out, refresh_every=1, mininterval=0)], n_train=16, bs=8).fit(1)
    assert "2/2" in out.getvalue() and "loss=" in out.getvalue()


def test_live_plot_in_a_notebook_updates_one_display(monkeypatch):
    """Jupyter's display is faked: the plot is shown once, then updated in place, each time as a PNG image
    (a bare Figure shows as the text "<Figure size ...>" in a fresh kernel)."""
    from deepscope.callbacks import progress

    calls = {"display": 0, "update": 0, "lines": 0, "shown": []}
    original = progress.loss_figure

    def spy(*args):
        fig = original(*args)
        calls["lines"] = len(fig.axes[0].lines)
        return fig

    monkeypatch.setattr(progress, "loss_figure", spy)

    class Handle:
        def update(self, image):
            calls["update"] += 1
            calls["shown"].append(image)

    def display(image, display_id=False):
        calls["display"] += 1
        calls["shown"].append(image)
        assert display_id is True
        return Handle()

    make([MetricsCallback(), Recorder(), ProgressCallback(bars=False, table=False, plot=True, refresh_every=2, display=display)]).fit(2)
    assert calls["display"] == 1 and calls["update"] >= 3
    assert calls["lines"] == 2  # train curve and valid points
    png = [getattr(image, "data", image) for image in calls["shown"]]
    assert all(isinstance(p, bytes) and p.startswith(b"\x89PNG") for p in png)


def test_plots_in_a_notebook_are_returned_not_also_left_with_pyplot(monkeypatch):
    """In a Jupyter kernel pyplot's inline backend shows every figure it holds at the end of the cell: a
    plot function's figure must be the cell's value only, or it appears twice."""
    import matplotlib.pyplot as plt

    from deepscope import plots
    from deepscope.callbacks import progress

    plt.close("all")
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    fig = plots.plot_curve([3.0, 2.0, 1.0], title="loss")
    assert plt.get_fignums() == [] and len(fig.axes[0].lines) == 1
    monkeypatch.setattr(progress, "in_notebook", lambda: False)
    fig = plots.plot_curve([3.0, 2.0, 1.0])
    assert plt.get_fignums() == [fig.number]  # a script keeps pyplot's figure, for plt.show()
    plt.close("all")


def test_without_ipywidgets_a_notebook_gets_the_plain_text_bar(monkeypatch):
    import sys

    from tqdm import tqdm as std_tqdm

    from deepscope.callbacks import progress

    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets raises ImportError
    assert progress.bar_class() is std_tqdm


@pytest.mark.gpu
def test_fit_on_cuda_keeps_model_and_batches_there():
    seen = []

    class Where(Callback):
        order = 50

        def after_pred(self, learn):
            seen.append((learn.xb.device.type, learn.preds.device.type))

    learn = make([DeviceCallback("cuda", channels_last=True), MetricsCallback(), Where()])
    learn.fit(1)
    assert set(seen) == {("cuda", "cuda")} and next(learn.model.parameters()).is_cuda


def test_cosine_schedule_and_the_recorder_plots_it():
    from deepscope.callbacks import CosineSchedule

    recorder = Recorder()
    learn = make([CosineSchedule(0.5, div_final=100), recorder], n_train=80, bs=8)
    learn.fit(2)  # 20 steps
    lrs = recorder.lrs
    assert lrs[0] == pytest.approx(0.5) and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[10] == pytest.approx(0.5 / 100 + (0.5 - 0.5 / 100) * (1 + math.cos(math.pi * 0.5)) / 2)
    fig = recorder.plot_schedule()
    assert list(fig.axes[0].lines[0].get_ydata()) == lrs
    fig = recorder.plot_loss()
    assert list(fig.axes[0].lines[0].get_ydata()) == recorder.losses


class FakeClock:
    """(wall, cpu) seconds: each call advances the wall clock by `wall` and the CPU clock by `cpu`."""

    def __init__(self, wall, cpu):
        self.wall, self.cpu, self.now = wall, cpu, (0.0, 0.0)

    def __call__(self):
        self.now = (self.now[0] + self.wall, self.now[1] + self.cpu)
        return self.now


@pytest.mark.parametrize("cpu, hinted", [(0.5, True), (5.0, False)])
def test_a_busy_machine_gets_one_hint_per_fit(cpu, hinted, one_thread):
    """10 s of wall time per epoch with 0.5 s of CPU on one thread: other processes had the core."""
    out = io.StringIO()
    make([MetricsCallback(), ProgressCallback(bars=False, file=out, clock=FakeClock(10.0, cpu))]).fit(3)
    text = out.getvalue()
    assert text.count("hint: this epoch took") == (1 if hinted else 0)
    if hinted:
        assert "other processes are using the cores" in text and "--threads" in text


def test_no_busy_hint_under_torchrun_or_while_torch_compile_works(one_thread, monkeypatch):
    from deepscope import distributed
    from deepscope.callbacks import Compile

    out = io.StringIO()  # a compiling first epoch: the compiler's worker processes did part of the work
    make([MetricsCallback(), Compile("eager"), ProgressCallback(bars=False, file=out, clock=FakeClock(10.0, 0.5))]).fit(1)
    assert "hint: this epoch took" not in out.getvalue()
    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # processes of one job share the cores by design
    out = io.StringIO()
    make([MetricsCallback(), ProgressCallback(bars=False, file=out, clock=FakeClock(10.0, 0.5))]).fit(2)
    assert "hint: this epoch took" not in out.getvalue()
