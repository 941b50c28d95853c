"""PhaseTimer (callbacks/timing.py): where the time of a training pass goes, and the engine's host-time counter."""
import io
import json
import shutil
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deepscope.callback import Callback, CallbackError, CancelBatchException
from deepscope.callbacks import (
    DeviceCallback, EarlyStopping, LimitBatches, MetricsCallback, PhaseTimer, ProgressCallback,
)
from deepscope.callbacks.timing import PHASES, TIMING_KEY, epoch_timing, summary_line, timing_rows
from deepscope.data import DataLoaders, TensorBatches
from deepscope.learner import Learner
from deepscope.lr_find import lr_find
from deepscope.stats import ActivationStats

pytestmark = pytest.mark.usefixtures("one_thread")  # timings of tiny models: one thread, no spinning
SLEEP = 0.01  # an artificial delay far above what each phase of these tiny models takes (~0.1 ms)


def make(cbs=(), *, model=None, train=None, n=64, bs=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    dls = DataLoaders(train if train is not None else TensorBatches(x, y, bs), TensorBatches(x, y, 2 * bs), n_classes=3)
    model = model or nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return Learner(model, dls, F.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, cbs=list(cbs))


class PassWall(Callback):
    """The training pass's wall time as a callback between the timer's partners sees it."""

    def __init__(self):
        self.seconds = []

    def before_train(self, learn):
        self._t = time.perf_counter()

    def cleanup_train(self, learn):
        self.seconds.append(time.perf_counter() - self._t)


class SlowForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        time.sleep(SLEEP)
        return self.lin(x)


class SlowData:
    """Batches that take SLEEP seconds each to make."""

    def __init__(self, n_batches=4, bs=8):
        self.n_batches, self.bs = n_batches, bs

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            time.sleep(SLEEP)
            yield torch.randn(self.bs, 6), torch.randint(0, 3, (self.bs,))


def largest(record):
    return max(record["phases"], key=record["phases"].get)


def test_phases_are_non_negative_and_add_up_to_the_training_pass():
    timer, wall = PhaseTimer(), PassWall()
    learn = make([MetricsCallback(), timer, wall])
    learn.fit(2)
    assert timer.failed is None and len(timer.history) == 2
    for record, inner in zip(timer.history, wall.seconds):
        assert set(record["phases"]) == set(PHASES) and all(s >= 0 for s in record["phases"].values())
        assert sum(record["phases"].values()) == pytest.approx(record["train_seconds"], rel=1e-9)
        # The timer's pass runs from before the first callback of before_train to after the last of
        # cleanup_train, so it holds PassWall's and exceeds it only by the callbacks outside it (microseconds);
        # 10 ms + 5% leaves room for a scheduler hiccup without hiding a phase that is missed or counted twice.
        assert inner <= record["train_seconds"] <= inner * 1.05 + 0.01
        assert record["samples_per_s"] == pytest.approx(64 / record["train_seconds"])
        assert record["valid_seconds"] > 0
        assert record["valid_samples_per_s"] == pytest.approx(64 / record["valid_seconds"])
    assert learn.get_cb(MetricsCallback).history[1][TIMING_KEY] is timer.history[1]
    assert all(not type(cb).__name__.startswith("_Event") for cb in learn.cbs)  # the partners left with the fit


def test_a_slow_forward_pass_shows_as_forward():
    timer = PhaseTimer()
    make([timer], model=SlowForward()).fit(1)
    record = timer.history[0]
    assert largest(record) == "forward" and record["phases"]["forward"] >= 8 * SLEEP * 0.9


def test_slow_data_shows_as_data():
    timer = PhaseTimer()
    make([timer], train=SlowData(4)).fit(1)
    record = timer.history[0]
    assert largest(record) == "data" and record["phases"]["data"] >= 4 * SLEEP * 0.9


def test_a_slow_callback_shows_as_callbacks():
    class Slow(Callback):
        def after_loss(self, learn):
            if learn.training:
                time.sleep(SLEEP)

    timer = PhaseTimer()
    make([timer, Slow()]).fit(1)
    record = timer.history[0]
    assert largest(record) == "callbacks" and record["phases"]["callbacks"] >= 8 * SLEEP * 0.9


def test_statistics_is_the_engines_host_time_taken_out_of_the_other_phases():
    timer, stats, wall = PhaseTimer(), ActivationStats(), PassWall()
    make([timer, stats, wall]).fit(1)
    record = timer.history[0]
    assert record["phases"]["statistics"] > 0
    assert record["phases"]["statistics"] <= stats.recorder.host_seconds  # the validation pass's is not in it
    assert wall.seconds[0] <= record["train_seconds"] <= wall.seconds[0] * 1.05 + 0.01


def test_the_engine_counts_a_nested_call_once(monkeypatch):
    stats = ActivationStats(flush_every=2)
    make([stats]).fit(1)
    rec = stats.recorder
    before, reads = rec.host_seconds, []
    # each read of the clock is one second later: flush (timed) calls _summarise (timed too), and only the
    # outer call may read the clock, twice
    monkeypatch.setattr("deepscope.stats.engine.time.perf_counter", lambda: reads.append(1) or float(len(reads)))
    rec.flush()
    assert len(reads) == 2 and rec.host_seconds == pytest.approx(before + 1.0)


def test_cancelled_batches_and_errors_never_make_the_timer_raise():
    class CancelAfterBackward(Callback):
        def after_backward(self, learn):
            if learn.iter % 2:
                learn.model.zero_grad()
                raise CancelBatchException()

    timer, wall = PhaseTimer(), PassWall()
    learn = make([timer, wall, CancelAfterBackward(), LimitBatches(train=6)])
    learn.fit(1)
    record = timer.history[0]
    assert timer.failed is None and all(s >= 0 for s in record["phases"].values())
    assert wall.seconds[0] <= record["train_seconds"] <= wall.seconds[0] * 1.05 + 0.01
    assert record["samples_per_s"] == pytest.approx(6 * 8 / record["train_seconds"])  # the limit's extra batch: no item

    class Boom(Exception):
        pass

    class Fails(Callback):
        def after_pred(self, learn):
            if learn.iter == 2:
                raise Boom("in the middle")

    learn = make([timer, Fails()])
    with pytest.raises(CallbackError) as info:
        learn.fit(2)
    assert isinstance(info.value.error, Boom)  # the callback's error, not one of the timer's
    assert timer.failed is None and timer.history == []
    assert all(not type(cb).__name__.startswith("_Event") for cb in learn.cbs)


def test_a_broken_clock_stops_timing_not_training(monkeypatch):
    timer = PhaseTimer()
    learn = make([MetricsCallback(), timer])
    monkeypatch.setattr("deepscope.callbacks.clocks.HostClock.mark", lambda self: 1 / 0)
    learn.fit(1)
    assert "ZeroDivisionError" in timer.failed and timer.history == []
    assert TIMING_KEY not in learn.get_cb(MetricsCallback).history[0]


def test_lr_find_leaves_the_timer_alone():
    timer, metrics = PhaseTimer(), MetricsCallback()
    learn = make([metrics, timer])
    learn.fit(1)
    before = json.dumps(timer.history)
    lr_find(learn, 1e-3, 1.0, num_it=10)
    assert json.dumps(timer.history) == before and learn.cbs == [metrics, timer]


def test_with_progress_and_early_stopping_every_epoch_has_its_timing():
    out = io.StringIO()
    timer, metrics = PhaseTimer(), MetricsCallback()
    learn = make([DeviceCallback("cpu"), metrics, ProgressCallback(bars=False, file=out), timer,
                  EarlyStopping(patience=1, min_delta=1e9)])
    learn.fit(5)
    assert len(metrics.history) == 2  # stopped after its second epoch, inside after_epoch
    assert all(TIMING_KEY in r for r in metrics.history)
    assert "timing" not in out.getvalue()  # the printed table shows only numbers


def test_state_dict_round_trip_continues_the_epoch():
    timer = PhaseTimer()
    saved = {}

    class Save(Callback):
        def cleanup_batch(self, learn):
            if learn.training and learn.iter == 3:
                saved.update(json.loads(json.dumps(timer.state_dict())))  # plain JSON

    make([timer, Save()]).fit(1)
    assert saved["epoch"] == 0 and saved["items"]["train"] == 4 * 8 and saved["seconds"]["forward"] > 0

    resumed, fresh = PhaseTimer(), PhaseTimer()

    class Load(Callback):  # where a resume loads it: after the epoch's before_train
        def before_train(self, learn):
            resumed.load_state_dict(saved)

    make([resumed, Load()]).fit(1)
    make([fresh]).fit(1)
    record = resumed.history[0]
    assert record["samples_per_s"] == pytest.approx((64 + 32) / record["train_seconds"])
    for phase in ("data", "forward", "backward"):
        assert record["phases"][phase] >= saved["seconds"][phase]
    assert resumed.state_dict()["history"] == [record]

    other_epoch = dict(saved, epoch=5)
    later = PhaseTimer()
    later.load_state_dict(other_epoch)  # not this fit's epoch 0: dropped when epoch 0 begins
    make([later]).fit(1)
    assert later.history[0]["samples_per_s"] == pytest.approx(64 / later.history[0]["train_seconds"])


def test_a_state_the_timer_did_not_make_is_a_value_error():
    with pytest.raises(ValueError, match="not a state of PhaseTimer.state_dict"):
        PhaseTimer().load_state_dict({"epoch": 0, "seconds": "fast"})


def test_epoch_timing_caps_statistics_at_the_phase_it_fell_in():
    record = epoch_timing({"forward": 1.0, "backward": 2.0, "valid": 0.5}, {"forward": 0.25, "backward": 3.0},
                          {"train": 30, "valid": 10})
    assert record["phases"]["forward"] == 0.75 and record["phases"]["backward"] == 0.0
    assert record["phases"]["statistics"] == 2.25 and record["train_seconds"] == 3.0
    assert record["samples_per_s"] == 10 and record["valid_samples_per_s"] == 20
    empty = epoch_timing({}, {}, {"train": 0, "valid": 0})
    assert empty["samples_per_s"] is None and empty["train_seconds"] is None and empty["valid_seconds"] is None


def test_timing_rows_and_the_terminal_line():
    timing = epoch_timing({"data": 1.0, "forward": 3.0}, {}, {"train": 400, "valid": 0})
    rows = timing_rows([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, TIMING_KEY: timing}])
    assert len(rows) == 1 and rows[0]["epoch"] == 2 and rows[0]["phases"]["forward"] == (3.0, 75.0)
    assert timing_rows([{"epoch": 1}]) == []  # a run older than the timer
    with pytest.raises(ValueError, match="phases"):
        timing_rows([{"epoch": 1, TIMING_KEY: {"phases": {"data": "slow"}}}])
    assert summary_line(timing) == ("last epoch: 100 samples/s in training; of its 4 s training pass: forward 75%, "
                                    "data 25%, loss 0%")
    assert summary_line(None) is None


@pytest.mark.gpu
def test_no_host_sync_per_step_on_cuda(monkeypatch):
    syncs = []
    original = torch.cuda.Stream.synchronize
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", lambda self: (syncs.append("stream"), original(self))[1])
    original_device = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (syncs.append("device"), original_device(*a))[1])

    class SyncDebug(Callback):  # an implicit sync (item, a blocking copy) inside the step is an error
        order = -30

        def before_batch(self, learn):
            torch.cuda.set_sync_debug_mode("error")

        def cleanup_batch(self, learn):
            torch.cuda.set_sync_debug_mode("default")

    timer = PhaseTimer()
    learn = make([DeviceCallback("cuda"), timer, SyncDebug()], n=64 * 20, bs=8)  # 160 steps: past READ_EVERY marks
    try:
        learn.fit(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert timer.failed is None and len(timer.history) == 2
    assert len(syncs) == 2  # one per epoch, at after_epoch
    for record in timer.history:
        assert all(s >= 0 for s in record["phases"].values()) and record["samples_per_s"] > 0


def test_train_records_the_timing_per_epoch_and_every_reader_copes(tiny_data, tmp_path, capsys):
    from deepscope.cli import main
    from deepscope.compare import render_compare
    from deepscope.plots import plot_metrics
    from deepscope.report import load_run

    runs = [tmp_path / "a", tmp_path / "b"]
    code = main(["train", "--data-dir", str(tiny_data), "--out", str(runs[0]), "--no-verify", "--epochs", "2",
                 "--batch-size", "16", "--nfs", "4", "--device", "cpu", "--limit-batches", "3", "--no-stats",
                 "--quiet"])  # no statistics: the report's layer panels take seconds to draw
    assert code == 0
    shutil.copytree(runs[0], runs[1])  # a second run to compare with, without training it
    printed = capsys.readouterr().out
    assert "samples/s in training" in printed
    records = json.loads((runs[0] / "metrics.json").read_text())
    assert [sorted(r[TIMING_KEY]["phases"]) for r in records] == [sorted(PHASES)] * 2
    assert all(r[TIMING_KEY]["samples_per_s"] > 0 and r[TIMING_KEY]["phases"]["statistics"] == 0 for r in records)
    run = load_run(runs[0])
    assert "timing" not in run["metrics"][0] and len(run["timing"]) == 2  # a nested record is no column
    html = (runs[0] / "report.html").read_text()
    assert "Where the time went" in html and "<th>statistics</th>" in html
    plot_metrics(records)
    assert "<html" in render_compare(runs)
    assert main(["runs", str(tmp_path)]) == 0


def test_a_report_of_a_run_older_than_the_timer_renders(tiny_data, tmp_path):
    from deepscope.cli import main
    from deepscope.report import render_report

    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tiny_data), "--out", str(out), "--no-verify", "--epochs", "1",
                 "--batch-size", "16", "--nfs", "4", "--device", "cpu", "--limit-batches", "2", "--no-stats",
                 "--quiet"]) == 0
    records = json.loads((out / "metrics.json").read_text())
    for r in records:
        del r[TIMING_KEY]
    (out / "metrics.json").write_text(json.dumps(records))
    html = render_report(out)
    assert "Where the time went" not in html and 'id="profile"' not in html


class LateClock:
    """A clock whose marks can be read only after wait(), like CUDA events the GPU has not reached."""

    def __init__(self):
        self.t, self.reached, self.released = 0.0, 0.0, []

    def mark(self):
        self.t += 1.0
        return self.t

    def passed(self, mark):
        return mark <= self.reached

    def seconds(self, start, end):
        return end - start

    def wait(self):
        self.reached = self.t

    def release(self, mark):
        self.released.append(mark)


def test_intervals_are_read_once_the_clock_has_passed_them_and_the_queue_stays_short():
    from deepscope.callbacks.clocks import READ_EVERY, Intervals

    clock = LateClock()
    intervals = Intervals(clock)
    intervals.add(None)
    intervals.add("forward")
    intervals.add("backward")
    intervals.read()
    assert intervals.sums == {}  # nothing passed yet, and read() does not wait
    intervals.read(wait=True)
    assert intervals.sums == {"forward": 1.0, "backward": 1.0} and clock.released == [1.0, 2.0]
    intervals.add(None)  # a new row: the gap before it is no phase's
    intervals.add("valid")
    intervals.read(wait=True)
    assert intervals.sums["valid"] == 1.0 and sum(intervals.sums.values()) == 3.0
    clock.reached = float("inf")  # from now on the "GPU" keeps up
    for _ in range(3 * READ_EVERY):
        intervals.add("step")
    assert len(intervals._queue) < READ_EVERY and intervals.sums["step"] >= 2 * READ_EVERY
