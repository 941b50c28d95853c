"""The callback contract (Learner's docstring): what the state means at each event, honoured by every built-in
callback, checked on combinations of built-ins against float32 or hand-computed references."""
import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassF1Score

from deepscope.callback import EVENTS, Callback, CallbackError, CancelBatchException, CancelFitException
from deepscope.callbacks import (
    CosineSchedule, DeviceCallback, EarlyStopping, GradClip, LimitBatches, MetricsCallback, MixedPrecision,
    OneCycle, ParamScheduler, ProgressCallback, Recorder, SaveBest, SingleBatch,
)
from deepscope.callbacks.schedule import one_cycle_lr
from deepscope.data import DataLoaders, TensorBatches
from deepscope.diagnose import Diagnose, problems
from deepscope.errors import ConfigError, DataError
from deepscope.learner import Learner
from deepscope.lr_find import LRFinder, lr_find
from deepscope.stats import ActivationStats
from deepscope.weights import load_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def make(cbs=(), *, lr=0.5, n=64, bs=16, valid=True, loss_func=F.cross_entropy, opt_func=torch.optim.SGD):
    x, y = data(n)
    xv, yv = data(32, seed=1)
    dls = DataLoaders(TensorBatches(x, y, bs), TensorBatches(xv, yv, 16) if valid else None, n_classes=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(model, dls, loss_func, lr=lr, opt_func=opt_func, cbs=list(cbs))


def weights(learn):
    return [p.detach().clone() for p in learn.model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


class At(Callback):
    """Calls `fn(learn)` at one event."""

    def __init__(self, event, fn, order=50, in_lr_sweep=True):
        self.order, self.in_lr_sweep = order, in_lr_sweep
        setattr(self, event, fn)


class Fake(Callback):
    """Overwrites record[key] after each epoch with the next of `values` (after MetricsCallback, before monitors)."""

    order = 20

    def __init__(self, **values):
        self.values, self.i = values, 0

    def after_epoch(self, learn):
        record = learn.get_cb(MetricsCallback).history[-1]
        for key, values in self.values.items():
            record[key] = values[self.i]
        self.i += 1


class Snapshots(Callback):
    order = 50  # after SaveBest (40) has saved

    def __init__(self):
        self.by_epoch = []

    def after_epoch(self, learn):
        self.by_epoch.append(weights(learn))


# --- the contract is written down -------------------------------------------------------------------------
def test_the_learner_docstring_says_what_the_state_means_at_every_event():
    doc = Learner.__doc__
    for event in EVENTS:
        assert event in doc or (event.startswith("cleanup_") and "cleanup_X" in doc), event
    for state in ("p.grad", "loss_scale", "skip_step", "iters_per_epoch", "n_iter", "train_iter", "error", "lr_sweep"):
        assert state in doc


# --- mixed precision: gradients, loss and skipped steps ---------------------------------------------------
class Capture(Callback):
    order = 30  # after GradClip (20)

    def __init__(self):
        self.losses, self.scales, self.grads, self.skips = [], [], [], []

    def after_loss(self, learn):
        if learn.training:
            self.losses.append(learn.loss.detach().clone())
            self.scales.append(None if learn.loss_scale is None else float(learn.loss_scale))

    def after_backward(self, learn):
        self.grads.append([p.grad.clone() for p in learn.model.parameters()])
        self.skips.append(learn.skip_step)


def test_float16_gradients_are_true_at_after_backward_and_the_loss_is_unscaled():
    """lr=0 keeps the weights fixed, so every batch's float16 loss and gradients can be compared with float32."""
    ref, half = Capture(), Capture()
    make([ref], lr=0.0).fit(1)
    make([MixedPrecision(torch.float16), half], lr=0.0).fit(1)
    assert ref.scales == [None] * 4 and half.scales == [65536.0] * 4 and half.skips == [False] * 4
    for a, b in zip(ref.losses, half.losses):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-2)
    for grads32, grads16 in zip(ref.grads, half.grads):
        for g32, g16 in zip(grads32, grads16):
            assert torch.allclose(g16, g32, rtol=2e-2, atol=2e-4)  # not x65536


def test_grad_clip_under_float16_clips_true_gradients_like_float32():
    clip32, clip16 = GradClip(0.05, keep_norms=True), GradClip(0.05, keep_norms=True)
    learn32, learn16 = make([clip32]), make([MixedPrecision(torch.float16), clip16])
    start = weights(learn32)
    learn32.fit(2)
    learn16.fit(2)
    norms32, norms16 = torch.stack(clip32.norms), torch.stack(clip16.norms)
    assert len(norms16) == 8 and torch.allclose(norms16, norms32, rtol=1e-2)  # raw norms, not x65536
    for w0, w32, w16 in zip(start, weights(learn32), weights(learn16)):
        assert torch.allclose(w16, w32, atol=1e-3)
        assert (w32 - w0).abs().max() > 1e-2  # training moved: the comparison is not of two frozen models


def overflowing_loss(preds, y):
    """Its gradient (4 per output) times the initial loss scale 65536 overflows float16: the scaler skips
    steps and halves the scale until it fits (weight gradients, sums over the batch, need a few halvings more)."""
    return preds.float().sum() * 4


def test_a_step_the_scaler_skips_is_flagged_and_no_callback_calls_it_a_nan_error():
    class Steps(Callback):
        order = 60

        def __init__(self):
            self.rows = []

        def after_backward(self, learn):
            self.before = weights(learn)

        def after_step(self, learn):
            self.rows.append((learn.skip_step, same(self.before, weights(learn))))

    steps, clip = Steps(), GradClip(100.0, keep_norms=True)
    stats, diag = ActivationStats(subsample=None), Diagnose()
    learn = make([MixedPrecision(torch.float16), clip, steps, stats, diag], n=96, bs=8, lr=1e-4, valid=False,
                 loss_func=overflowing_loss)
    learn.fit(1)
    skipped = [s for s, _ in steps.rows]
    assert skipped[0] and not skipped[-1]  # the first steps overflow, later ones fit
    assert all(unchanged == skip for skip, unchanged in steps.rows)  # skip_step <=> the weights did not move
    norms = np.array([float(n) for n in clip.norms])
    assert np.isnan(norms[skipped]).all() and np.isfinite(norms[~np.array(skipped)]).all()
    s = stats.stats()
    for field in (s.grad_norm, s.param_grad_norm, s.update_ratio):
        assert np.isnan(field[skipped]).all() and np.isfinite(field[~np.array(skipped)]).all()
    assert np.isfinite(s.act_std).all()  # activations are recorded on skipped steps too
    assert not [f for f in problems(diag.findings) if f.kind.startswith("nonfinite")]


@pytest.mark.parametrize("subsample", [None, 8])
def test_activation_stats_records_true_gradients_under_float16(subsample):
    """Same frozen weights (lr=0), float32 and float16: output-gradient statistics agree, not x65536.
    subsample=8 samples the outputs (16 x 16 or 16 x 3 values), None summarises them whole."""
    s32, s16 = ActivationStats(subsample=subsample), ActivationStats(subsample=subsample)
    make([s32], lr=0.0).fit(1)
    make([MixedPrecision(torch.float16), s16], lr=0.0).fit(1)
    a, b = s32.stats(), s16.stats()
    if subsample == 8:  # a sample: the positions differ between runs only through the data, not the precision
        assert np.allclose(b.grad_norm, a.grad_norm, rtol=0.05)
    else:
        assert np.allclose(b.grad_norm, a.grad_norm, rtol=1e-2) and np.allclose(b.grad_std, a.grad_std, rtol=1e-2)
    assert np.allclose(b.param_grad_norm, a.param_grad_norm, rtol=1e-2)


def test_activation_stats_with_its_default_sample_under_mixed_precision():
    s32, s16 = ActivationStats(), ActivationStats()
    make([s32], lr=0.0).fit(1)
    make([MixedPrecision(torch.float16), s16], lr=0.0).fit(1)
    assert np.allclose(s16.stats().grad_norm, s32.stats().grad_norm, rtol=1e-2)


def test_gradient_accumulation_under_float16_matches_float32():
    """A batch cancelled after backward keeps its gradients for the next (the scaler's unscaling must not break
    that, nor mix scaled and unscaled gradients)."""
    def accumulate(learn):
        if learn.train_iter % 2 == 0:
            raise CancelBatchException()

    runs = {}
    for name, extra in (("float32", []), ("float16", [MixedPrecision(torch.float16)])):
        capture = Capture()
        capture.order = 1  # sees every batch's gradients before the cancel
        learn = make([*extra, capture, At("after_backward", accumulate, order=25)], n=128)
        learn.fit(1)
        runs[name] = (capture, weights(learn))
    (c32, w32), (c16, w16) = runs["float32"], runs["float16"]
    for grads32, grads16 in zip(c32.grads, c16.grads):  # batch 1 holds batches 0 + 1, and so on
        for g32, g16 in zip(grads32, grads16):
            assert torch.allclose(g16, g32, rtol=2e-2, atol=5e-4)
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(w32, w16))


def test_the_loss_is_float32_under_mixed_precision_even_when_loss_func_is_not():
    def squared_error(preds, y):  # under autocast: a bfloat16 result, 3 significant digits
        return ((preds - F.one_hot(y, 3)) ** 2).mean()

    seen = []
    learn = make([MixedPrecision(torch.bfloat16), At("after_loss", lambda l: seen.append(l.loss.dtype))],
                 loss_func=squared_error)
    learn.fit(1)
    assert set(seen) == {torch.float32}


# --- SaveBest and EarlyStopping ---------------------------------------------------------------------------
def test_save_best_restores_the_best_weights_when_early_stopping_cancels(tmp_path):
    snaps = Snapshots()
    saver, stopper = SaveBest(tmp_path / "best.safetensors"), EarlyStopping(patience=2)
    learn = make([MetricsCallback(), Fake(valid_loss=[1.0, 0.5, 0.7, 0.8, 0.9]), saver, stopper, snaps])
    learn.fit(5)
    assert stopper.stopped_epoch == 3 and saver.best_epoch == 1
    assert same(weights(learn), snaps.by_epoch[1]) and not same(weights(learn), snaps.by_epoch[3])


def test_an_error_leaves_the_weights_of_the_failure_and_restore_loads_the_best(tmp_path):
    def boom(learn):
        if learn.epoch == 2:
            raise RuntimeError("boom")

    snaps, saver, seen = Snapshots(), SaveBest(tmp_path / "best.safetensors"), []
    learn = make([MetricsCallback(), Fake(valid_loss=[1.0, 0.5, 0.7]), saver, snaps, At("after_epoch", boom, order=60),
                  At("cleanup_fit", lambda l: seen.append(l.error), order=70)])
    with pytest.raises(CallbackError, match="boom"):
        learn.fit(3)
    assert isinstance(seen[0].__cause__, RuntimeError)  # cleanup_fit saw the error on its way out
    assert same(weights(learn), snaps.by_epoch[2])  # untouched while the error propagated
    assert saver.restore(learn) and same(weights(learn), snaps.by_epoch[1])


def test_cleanup_sees_no_error_after_a_cancel():
    seen = []
    learn = make([At("after_step", lambda l: (_ for _ in ()).throw(CancelFitException())),
                  At("cleanup_fit", lambda l: seen.append(l.error))])
    learn.fit(1)
    assert seen == [None]


def test_early_stopping_runs_last_so_the_stopping_epoch_reaches_every_callback(tmp_path):
    """EarlyStopping listed first, monitoring the loss; SaveBest the accuracy, best at the stopping epoch."""
    epochs_seen = []
    stopper, saver = EarlyStopping("valid_loss", patience=2), SaveBest(tmp_path / "best.safetensors", "valid_accuracy")
    learn = make([stopper, MetricsCallback(), Fake(valid_loss=[1.0, 2.0, 3.0, 4.0], valid_accuracy=[0.1, 0.2, 0.3, 0.4]), saver,
                  At("after_epoch", lambda l: epochs_seen.append(l.epoch), order=90)])
    learn.fit(4)
    assert stopper.stopped_epoch == 2 and saver.best_epoch == 2 and epochs_seen == [0, 1, 2]


def test_monitors_start_afresh_with_each_fit(tmp_path):
    snaps = Snapshots()
    saver, stopper = SaveBest(tmp_path / "best.safetensors"), EarlyStopping(patience=5)
    learn = make([MetricsCallback(), Fake(valid_loss=[0.1, 0.2, 0.5, 0.4, 0.6]), saver, stopper, snaps])
    learn.fit(2)
    assert saver.best == 0.1 and saver.best_epoch == 0
    learn.fit(3)  # never as good as the first fit
    assert saver.best == 0.4 and saver.best_epoch == 1 and stopper.best == 0.4 and stopper.wait == 1
    assert same(weights(learn), snaps.by_epoch[2 + 1])  # the second fit's best, not the first fit's


# --- which way is better ----------------------------------------------------------------------------------
def test_direction_comes_from_the_metric_type_and_is_printed(capsys):
    f1 = MetricsCallback({"f1": MulticlassF1Score(3, average="macro")})
    stopper = EarlyStopping("valid_f1", patience=1)
    make([f1, Fake(valid_f1=[0.1, 0.2, 0.3]), stopper]).fit(3)
    assert stopper.direction == "max" and stopper.stopped_epoch is None  # rising F1 is improvement
    assert "EarlyStopping: monitoring valid_f1, higher is better (from torchmetrics MulticlassF1Score)" in capsys.readouterr().out
    loss, acc = EarlyStopping("valid_loss"), EarlyStopping("valid_accuracy")
    make([MetricsCallback(), loss, acc]).fit(1)
    out = capsys.readouterr().out
    assert loss.direction == "min" and "valid_loss, lower is better (a loss)" in out
    assert acc.direction == "max" and "from torchmetrics MulticlassAccuracy" in out


class Unsaid(Metric):
    """A metric that does not say which way is better (torchmetrics' default: higher_is_better None)."""

    def __init__(self):
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds, target):
        self.total += preds.float().mean()

    def compute(self):
        return self.total


def test_a_metric_without_a_direction_needs_mode(capsys):
    with pytest.raises(CallbackError, match="mode='max' or mode='min'") as info:
        make([MetricsCallback({"odd": Unsaid()}), EarlyStopping("valid_odd")]).fit(1)
    assert isinstance(info.value.__cause__, ConfigError)
    stopper = EarlyStopping("valid_odd", mode="max")
    make([MetricsCallback({"odd": Unsaid()}), stopper]).fit(1)
    assert stopper.direction == "max" and "mode='max' as given" in capsys.readouterr().out
    make([MetricsCallback(), EarlyStopping("valid_accuracy", mode="min")]).fit(1)
    assert "says the opposite" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="mode"):
        EarlyStopping(mode="up")


def test_train_metrics_do_not_leak_into_validation_metrics():
    metrics = MetricsCallback(train_metrics=True)
    learn = make([metrics], lr=0.0)  # frozen weights: both can be computed directly
    learn.fit(1)
    record = metrics.history[0]
    with torch.no_grad():
        train_acc = (learn.model(learn.dls.train.x).argmax(1) == learn.dls.train.y).float().mean().item()
        valid_acc = (learn.model(learn.dls.valid.x).argmax(1) == learn.dls.valid.y).float().mean().item()
    assert record["valid_accuracy"] == pytest.approx(valid_acc) and record["train_accuracy"] == pytest.approx(train_acc)
    assert train_acc != pytest.approx(valid_acc)  # else the test could not tell them apart
    assert metrics.direction("train_accuracy")[0] == "max"


# --- schedules: the batches the fit will really run -------------------------------------------------------
def test_one_cycle_plans_for_the_batches_limit_batches_lets_run():
    recorder, seen = Recorder(), []
    learn = make([OneCycle(1.0), LimitBatches(train=4), recorder,
                  At("before_train", lambda l: seen.append((l.n_iter, l.iters_per_epoch)), order=0)], n=160, bs=8)
    learn.fit(2)
    assert seen == [(4, 4), (4, 4)]  # 20 batches in the data, 4 run
    assert recorder.lrs == pytest.approx([one_cycle_lr(1.0)(i / 8) for i in range(8)])
    assert max(recorder.lrs) > 0.9 and recorder.lrs[-1] < 0.1  # peaks at the asked lr, then anneals


class Stream(torch.utils.data.IterableDataset):
    """Data of unknown length (no __len__), as from a stream."""

    def __init__(self, n):
        self.x, self.y = data(n)

    def __iter__(self):
        return iter(zip(self.x, self.y))


def stream_learner(cbs, n=40):
    dl = torch.utils.data.DataLoader(Stream(n), batch_size=8)
    torch.manual_seed(0)
    return Learner(nn.Linear(6, 3), DataLoaders(dl, None), lr=0.1, opt_func=torch.optim.SGD, cbs=cbs)


def test_data_of_unknown_length_trains_and_schedules_need_a_batch_count():
    seen = []
    stream_learner([At("before_train", lambda l: seen.append(l.n_iter))]).fit(1)
    assert seen == [None]
    with pytest.raises(CallbackError, match="LimitBatches") as info:
        stream_learner([CosineSchedule(0.5)]).fit(1)
    assert isinstance(info.value.__cause__, ConfigError)
    recorder = Recorder()
    learn = stream_learner([CosineSchedule(0.5, div_final=100), LimitBatches(train=5), recorder])
    learn.fit(2)
    total = 10
    assert recorder.lrs == pytest.approx([0.005 + 0.495 * (1 + math.cos(math.pi * i / total)) / 2 for i in range(total)])
    assert learn.lr == 0.1  # restored


# --- the LR finder: who takes part ------------------------------------------------------------------------
SITTING_OUT = [MetricsCallback(), Recorder(), ProgressCallback(), ParamScheduler({}), OneCycle(1.0), CosineSchedule(1.0),
               LimitBatches(1), SingleBatch(), SaveBest("x"), EarlyStopping(), ActivationStats(), Diagnose()]
TAKING_PART = [DeviceCallback("cpu"), MixedPrecision(), GradClip(), Callback(), LRFinder(1e-3, 1.0, 10)]


def test_built_in_callbacks_declare_whether_they_take_part_in_a_sweep():
    from deepscope.tensorboard import TensorBoardCallback

    assert all(not cb.in_lr_sweep for cb in SITTING_OUT) and not TensorBoardCallback.in_lr_sweep
    assert all(cb.in_lr_sweep for cb in TAKING_PART)


def test_lr_find_leaves_everything_the_fit_recorded_alone(tmp_path):
    clip_seen, own_seen = [], []

    def check_clip(learn):
        if learn.lr_sweep:
            clip_seen.append(float(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm()))

    out = io.StringIO()
    metrics, recorder, stats, diag = MetricsCallback(), Recorder(), ActivationStats(), Diagnose()
    saver, clip = SaveBest(tmp_path / "best.safetensors"), GradClip(0.5, keep_norms=True)
    cbs = [DeviceCallback("cpu"), metrics, recorder, ProgressCallback(bars=False, file=out), OneCycle(0.3),
           LimitBatches(train=3), saver, EarlyStopping(patience=5), stats, diag, clip,
           At("after_backward", check_clip, order=30),  # takes part, by default
           At("before_batch", lambda l: own_seen.append(l.lr_sweep), in_lr_sweep=False)]
    try:
        from deepscope.tensorboard import TensorBoardCallback
        import tensorboard  # noqa: F401
        cbs.append(TensorBoardCallback(tmp_path / "tb", stats=stats, every=1))
    except ImportError:
        pass
    learn = make(cbs, n=96, bs=8)
    learn.fit(2)
    before = {
        "metrics": copy.deepcopy(metrics.history), "losses": list(recorder.losses), "lrs": list(recorder.lrs),
        "stats": stats.stats(), "findings": list(diag.findings), "record": diag.record(learn).losses,
        "norms": [float(n) for n in clip.norms], "best": (tmp_path / "best.safetensors").read_bytes(),
        "progress": out.getvalue(), "tb": sorted((p.name, p.stat().st_size) for p in (tmp_path / "tb").glob("*")),
        "seen": list(own_seen),
    }
    result = lr_find(learn, 1e-4, 10.0, num_it=30)
    assert len(result.lrs) > 10  # the sweep ran, with SaveBest, EarlyStopping, ... in the learner
    assert clip_seen and max(clip_seen) <= 0.5 * (1 + 1e-4)  # GradClip clipped the sweep's steps
    after = stats.stats()
    for key in ("steps", "act_std", "grad_norm", "update_ratio"):
        assert np.array_equal(getattr(before["stats"], key), getattr(after, key), equal_nan=True)
    assert before["metrics"] == metrics.history and before["losses"] == recorder.losses and before["lrs"] == recorder.lrs
    assert before["findings"] == diag.findings and before["record"] == diag.record(learn).losses
    assert before["norms"] == [float(n) for n in clip.norms]
    assert before["best"] == (tmp_path / "best.safetensors").read_bytes() and before["progress"] == out.getvalue()
    assert before["tb"] == sorted((p.name, p.stat().st_size) for p in (tmp_path / "tb").glob("*"))
    assert before["seen"] == own_seen and not learn.lr_sweep
    assert learn.cbs == cbs


# --- the learner's own state ------------------------------------------------------------------------------
def test_a_fit_starts_without_gradients_a_cancelled_fit_left():
    def stop(learn):
        raise CancelFitException()

    learn, twin = make(), make()
    learn.fit(1, cbs=[At("after_backward", stop)])  # cancelled between backward and zero_grad
    assert learn.model[0].weight.grad is not None and same(weights(learn), weights(twin))
    learn.fit(1)
    twin.fit(1)
    assert same(weights(learn), weights(twin))


class Log(Callback):
    def __init__(self):
        self.events = []

    def before_fit(self, learn):
        self.events.append("before_fit")

    def cleanup_fit(self, learn):
        self.events.append("cleanup_fit")


class Empty:
    """An iterable of unknown length that yields nothing."""

    def __iter__(self):
        return iter(())


def test_an_empty_training_pass_is_a_data_error():
    log = Log()
    learn = Learner(nn.Linear(6, 3), DataLoaders([], None), cbs=[log])
    with pytest.raises(DataError, match="training data yielded no batches"):
        learn.fit(1)
    assert log.events == []  # known from len(): refused before any callback ran
    learn.dls.train = Empty()
    with pytest.raises(DataError, match="training data yielded no batches"):
        learn.fit(1)
    assert log.events == ["before_fit", "cleanup_fit"]
    with pytest.raises(DataError, match="training data yielded no batches"):
        Learner(nn.Linear(6, 3), DataLoaders(torch.utils.data.DataLoader(Stream(0)), None)).fit(1)


def test_an_empty_validation_pass_is_a_data_error_and_none_means_no_validation():
    x, y = data(16)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    with pytest.raises(DataError, match="validation data yielded no batches.*valid=None"):
        Learner(nn.Linear(6, 3), DataLoaders(batches, [])).fit(1)
    with pytest.raises(DataError, match="validation data yielded no batches"):
        Learner(nn.Linear(6, 3), DataLoaders(batches, Empty())).fit(1)
    metrics = MetricsCallback()
    Learner(nn.Linear(6, 3), DataLoaders(batches, None), cbs=[metrics]).fit(1)
    assert metrics.history[0]["valid_loss"] is None and metrics.history[0]["train_loss"] > 0
    Learner(nn.Linear(6, 3), DataLoaders(batches, [])).fit(1, valid=False)  # asked for no validation


@pytest.mark.parametrize("make", [
    lambda: EarlyStopping(patience=-1), lambda: EarlyStopping(patience=0), lambda: EarlyStopping(min_delta=-1),
    lambda: SaveBest("best.safetensors", min_delta=float("nan")), lambda: OneCycle(float("nan")),
    lambda: OneCycle(-1), lambda: OneCycle(0.1, pct_start=1.5), lambda: CosineSchedule(0),
    lambda: GradClip(float("nan")), lambda: GradClip(0), lambda: LimitBatches(train=0),
])
def test_built_in_callbacks_refuse_bad_arguments_when_made(make):
    from deepscope.errors import ConfigError

    with pytest.raises(ConfigError):
        make()


def test_a_failing_cleanup_does_not_mask_the_exception_that_ended_the_phase():
    """cleanup_fit fails while a KeyboardInterrupt (or any error) is on its way out: the interrupt is what
    the caller sees, with the clean-up's failure noted on it; with nothing on its way out, the clean-up's
    own error is raised as before."""
    class Stop(Callback):
        def after_pred(self, learn):
            raise KeyboardInterrupt()

    class BrokenCleanup(Callback):
        def cleanup_fit(self, learn):
            raise RuntimeError("cannot flush")

    learn = make([Stop(), BrokenCleanup()], n=32, bs=8, valid=False)
    with pytest.raises(KeyboardInterrupt) as info:
        learn.fit(1)
    assert "cleanup_fit failed too" in " ".join(getattr(info.value, "__notes__", ["cleanup_fit failed too"]))
    with pytest.raises(CallbackError, match="cannot flush"):
        make([BrokenCleanup()], n=32, bs=8, valid=False).fit(1)
