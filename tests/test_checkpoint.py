"""Checkpoints and exact resume in the Learner: the file format, every piece of state, and what is refused."""
import hashlib

import numpy as np
import pytest
import torch
from torch import nn

import deepscope as ds
from deepscope.callbacks import Checkpoint, EarlyStopping, GradClip, MetricsCallback, OneCycle, Recorder, SaveBest
from deepscope.checkpoint import (
    BEST, decode, encode, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, step_checkpoints,
    step_name, sweep_temporary,
)
from deepscope.data.loaders import DataLoaders, TensorBatches
from deepscope.errors import CheckpointError, ConfigError

STAT_FIELDS = ("steps", "weights", "act_mean", "act_std", "act_dead", "act_hist", "grad_norm", "weight_norm",
               "update_ratio")


# --- the file format --------------------------------------------------------------------------------------
def test_round_trip_keeps_types_and_values(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state(),
             "mixed": (1, 2.5, float("nan"), float("-inf"), None, True, "text"), "ints": {3: "a", 7: [1, 2]},
             "array": np.arange(6, dtype=np.uint32).reshape(2, 3), "empty": np.zeros(0, np.int64),
             "dtype": torch.bfloat16, "__odd": 1}
    save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert back["mixed"][:2] == (1, 2.5) and np.isnan(back["mixed"][2]) and back["mixed"][3:] == (
        float("-inf"), None, True, "text")
    assert back["ints"] == {3: "a", 7: [1, 2]} and back["dtype"] is torch.bfloat16 and back["__odd"] == 1
    assert back["array"].dtype == np.uint32 and np.array_equal(back["array"], state["array"])
    assert back["empty"].shape == (0,) and back["empty"].dtype == np.int64
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple stays a tuple
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(back["opt"])  # what torch wrote, torch takes back


def test_checksum_file_matches_sha256sum_and_a_flipped_bit_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    digest = save_checkpoint(path, {"w": torch.arange(100.0)})
    assert (tmp_path / "c.safetensors.sha256").read_text() == f"{digest}  c.safetensors\n"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # inside the last value: safetensors itself would load it silently
    path.write_bytes(bytes(data))
    assert decode(bytes(data))["w"][-1] != 99.0  # (proof that the format alone does not notice)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_missing_checksum_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(2)})
    (tmp_path / "c.safetensors.sha256").unlink()
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(path)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a deepscope checkpoint"):
        decode((tmp_path / "plain.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="cannot store a"):
        encode({"f": lambda: 0})


def test_latest_skips_a_corrupt_newest_and_temporary_files_are_swept(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(tmp_path / step_name(step), {"step": step})
    (tmp_path / step_name(15)).write_bytes(b"x" * 40)
    (tmp_path / "step-00000020.safetensors.tmp").write_bytes(b"half")
    said = []
    assert latest_checkpoint(tmp_path, log=said.append) == tmp_path / step_name(10)
    assert "step-00000015" in said[0] and "corrupt" in said[0]
    assert [p.name for p in step_checkpoints(tmp_path)] == [step_name(s) for s in (5, 10, 15)]
    assert sweep_temporary(tmp_path) == ["step-00000020.safetensors.tmp"]


def test_loading_runs_no_pickle(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"model": nn.Linear(2, 2).state_dict(), "rng": rng_state()})

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert set(load_checkpoint(path)) == {"model", "rng"}


# --- the Learner: stop anywhere, resume, get the same fit --------------------------------------------------
def _data(generator_seed=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    gen = torch.Generator().manual_seed(generator_seed)
    return DataLoaders(TensorBatches(x[:160], y[:160], 16, shuffle=True, generator=gen),
                       TensorBatches(x[160:], y[160:], 32), n_classes=2)


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


class StopAfter(ds.Callback):
    """Ends the fit with a KeyboardInterrupt after training step n (as a kill would, but in-process)."""
    order = 95

    def __init__(self, n):
        self.n = n

    def cleanup_batch(self, learn):
        if learn.training and learn.train_iter + 1 == self.n:
            raise KeyboardInterrupt


def _learner(folder, *extra, dls=None, every=7, monitor="valid_loss"):
    cbs = [MetricsCallback(train_metrics=True), Recorder(), OneCycle(2e-2), ds.ActivationStats(),
           GradClip(1.0, keep_norms=True), EarlyStopping(patience=5), Checkpoint(folder, every=every, monitor=monitor),
           *extra]
    return ds.Learner(_model(), dls or _data(), lr=2e-2, cbs=cbs)


def _assert_same_fit(a, b):
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "timing")} for r in h]
    assert strip(a.get_cb(MetricsCallback).history) == strip(b.get_cb(MetricsCallback).history)
    assert a.get_cb(Recorder).losses == b.get_cb(Recorder).losses and a.get_cb(Recorder).lrs == b.get_cb(Recorder).lrs
    assert [float(n) for n in a.get_cb(GradClip).norms] == [float(n) for n in b.get_cb(GradClip).norms]
    sa, sb = a.get_cb(ds.ActivationStats).stats(), b.get_cb(ds.ActivationStats).stats()
    for field in STAT_FIELDS:
        assert np.array_equal(getattr(sa, field), getattr(sb, field), equal_nan=True), field
    assert sa.structure["census"] == sb.structure["census"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    learn = _learner(tmp_path_factory.mktemp("ref"))
    learn.fit(3)
    return learn


# mid-epoch; the epoch's last batch; just after an epoch's end (its end-of-epoch checkpoint); mid-epoch; the end
@pytest.mark.parametrize("stop", [9, 10, 11, 17, 30])
def test_resume_gives_the_same_fit_bit_for_bit(tmp_path, uninterrupted, stop, one_thread):
    with pytest.raises(KeyboardInterrupt):
        _learner(tmp_path, StopAfter(stop)).fit(3)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None
    resumed = _learner(tmp_path)
    resumed.fit(3, resume_from=tmp_path)
    _assert_same_fit(uninterrupted, resumed)


def _interrupted_state(folder, stop=17):
    with pytest.raises(KeyboardInterrupt):
        _learner(folder, StopAfter(stop)).fit(3)
    path = latest_checkpoint(folder)
    state = load_checkpoint(path)
    assert 0 < state["progress"]["batch"] < 10  # mid-epoch
    return state


def _dropped(state, piece):
    """The checkpoint with one piece of state replaced by what a fresh start would have."""
    if piece == "optimizer":
        state["optimizer"] = torch.optim.AdamW(_model().parameters(), lr=2e-2).state_dict()
    elif piece == "schedule":
        state["progress"]["train_iter"] = 0
    elif piece == "rng":
        torch.manual_seed(1234)
        state["rng"] = rng_state()
    elif piece == "data order":
        state["data"]["state"]["order"] = torch.randperm(160, generator=torch.Generator().manual_seed(9))
    return state


@pytest.mark.parametrize("piece", ["optimizer", "schedule", "rng", "data order"])
def test_dropping_any_piece_of_state_breaks_the_equality(tmp_path, uninterrupted, piece, one_thread):
    state = _interrupted_state(tmp_path)
    whole = _learner(tmp_path)
    whole.fit(3, resume_from=load_checkpoint(latest_checkpoint(tmp_path)))
    _assert_same_fit(uninterrupted, whole)  # the whole state gives the same fit...
    broken = _learner(tmp_path)
    broken.fit(3, resume_from=_dropped(state, piece))
    same = all(torch.equal(v, w) for v, w in zip(uninterrupted.model.state_dict().values(),
                                                  broken.model.state_dict().values()))
    assert not same, f"resuming without the {piece} gave the same weights: the test could not fail"


def test_a_dataloader_without_state_resumes_by_replaying_the_epoch(tmp_path, one_thread):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 10, generator=g), torch.randint(0, 2, (96,), generator=g)
    ds_ = torch.utils.data.TensorDataset(x, y)

    def dls():
        return DataLoaders(torch.utils.data.DataLoader(ds_, batch_size=8, shuffle=True),
                           torch.utils.data.DataLoader(ds_, batch_size=32), n_classes=2)

    def learner(folder, *extra):
        return ds.Learner(_model(), dls(), lr=1e-2,
                          cbs=[MetricsCallback(), Recorder(), Checkpoint(folder, every=5), *extra])

    torch.manual_seed(7)
    ref = learner(tmp_path / "ref")
    ref.fit(2)
    torch.manual_seed(7)
    with pytest.raises(KeyboardInterrupt):
        learner(tmp_path / "b", StopAfter(8)).fit(2)
    assert load_checkpoint(latest_checkpoint(tmp_path / "b"))["data"]["kind"] == "replay"
    resumed = learner(tmp_path / "b")
    resumed.fit(2, resume_from=tmp_path / "b")
    assert all(torch.equal(v, w) for v, w in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()))
    assert ref.get_cb(Recorder).losses == resumed.get_cb(Recorder).losses


def test_keep_last_and_best(tmp_path, one_thread):
    learn = _learner(tmp_path, every=3)
    learn.fit(3)
    names = [p.name for p in step_checkpoints(tmp_path)]
    assert names == [step_name(27), step_name(30)]  # the last two; 30 is also the last epoch's end
    cb = learn.get_cb(Checkpoint)
    best_epoch = int(np.argmin([r["valid_loss"] for r in learn.get_cb(MetricsCallback).history]))
    best = load_checkpoint(tmp_path / BEST)
    assert best["progress"]["epoch"] == best_epoch + 1 and cb.best_path == tmp_path / BEST
    assert load_checkpoint(tmp_path / step_name(30))["callbacks"]["Checkpoint"]["kept"] == names


# --- what is refused ---------------------------------------------------------------------------------------
def test_another_model_is_refused_naming_keys_and_shapes(tmp_path, one_thread):
    _interrupted_state(tmp_path)
    other = ds.Learner(nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2), nn.Linear(2, 2)), _data(),
                       cbs=[MetricsCallback(), Recorder()])
    with pytest.raises(CheckpointError) as e:
        other.fit(3, resume_from=tmp_path)
    text = str(e.value)
    assert "0.weight (16, 10) in the checkpoint vs (8, 10) in the model" in text
    assert "missing from the checkpoint: 2.weight, 2.bias" in text
    assert "3.weight (2, 16) in the checkpoint vs (2, 2) in the model" in text


def test_other_epochs_callbacks_or_optimizer_are_refused(tmp_path, one_thread):
    _interrupted_state(tmp_path)
    with pytest.raises(CheckpointError, match=r"fit of 3 epochs; resume it with fit\(3"):
        _learner(tmp_path).fit(4, resume_from=tmp_path)
    fewer = ds.Learner(_model(), _data(), lr=2e-2, cbs=[MetricsCallback(train_metrics=True), Recorder(),
                                                          OneCycle(2e-2), Checkpoint(tmp_path, every=7)])
    with pytest.raises(CheckpointError, match="callbacks this learner lacks: .*ActivationStats"):
        fewer.fit(3, resume_from=tmp_path)
    sgd = _learner(tmp_path)
    sgd.opt_func = torch.optim.SGD  # the optimizer is made by fit, as usual
    with pytest.raises(CheckpointError, match="optimizer is AdamW, this learner.s is SGD"):
        sgd.fit(3, resume_from=tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _learner(tmp_path / "empty").fit(3, resume_from=tmp_path / "nothing-here")


def test_save_best_and_early_stopping_carry_their_state(tmp_path, one_thread):
    learn = _learner(tmp_path, SaveBest(tmp_path / "best.safetensors"))
    sb, es = learn.get_cb(SaveBest), learn.get_cb(EarlyStopping)
    sb.best, sb.best_epoch, es.best, es.wait = 0.25, 1, 0.5, 2
    assert learn.get_cb(SaveBest).state_dict() == {"best": 0.25, "direction": None, "best_epoch": 1}
    es2 = EarlyStopping()
    es2.load_state_dict(es.state_dict())
    assert (es2.best, es2.wait) == (0.5, 2)


def test_tensorboard_resumes_without_repeating_steps(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deepscope.tensorboard import TensorBoardCallback

    def learner(log, *extra):
        stats = ds.ActivationStats()
        return ds.Learner(_model(), _data(), lr=1e-2, cbs=[MetricsCallback(), Recorder(), stats,
                                                           TensorBoardCallback(log, stats=stats, every=1),
                                                           Checkpoint(tmp_path / log.name, every=4), *extra])

    learner(tmp_path / "ref").fit(2)
    with pytest.raises(KeyboardInterrupt):
        learner(tmp_path / "run", StopAfter(13)).fit(2)  # steps 12 and 13 are logged, the checkpoint is at 12
    learner(tmp_path / "run").fit(2, resume_from=tmp_path / "run")

    def scalars(log):
        acc = EventAccumulator(str(log), size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    ref, run = scalars(tmp_path / "ref"), scalars(tmp_path / "run")
    assert ref.keys() == run.keys() and len(ref) > 5
    for tag in ref:
        steps = [s for s, _ in run[tag]]
        assert steps == sorted(set(steps)), f"{tag}: a step logged twice {steps}"
        if "seconds" not in tag and "timing" not in tag and "samples_per_s" not in tag:  # wall-clock values
            assert run[tag] == ref[tag], tag


def test_float16_loss_scaler_state_resumes(tmp_path, one_thread):
    from deepscope.callbacks import MixedPrecision

    def learner(folder, *extra):
        return ds.Learner(_model(), _data(), lr=1e-2, cbs=[MetricsCallback(), Recorder(), MixedPrecision(torch.float16),
                                                           Checkpoint(folder, every=4), *extra])

    ref = learner(tmp_path / "ref")
    ref.fit(2)
    with pytest.raises(KeyboardInterrupt):
        learner(tmp_path / "run", StopAfter(14)).fit(2)
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["train_step"]["scaler"]["scale"] > 0  # the scaler's state is in the checkpoint
    resumed = learner(tmp_path / "run")
    resumed.fit(2, resume_from=tmp_path / "run")
    assert all(torch.equal(v, w) for v, w in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()))


def test_watch_in_your_own_loop_resumes_its_record(tmp_path, one_thread):
    """A plain loop checkpoints model, optimizer, random streams, its position and watch's record with
    save_checkpoint; resumed in a new watch, the record equals an uninterrupted one's."""
    from deepscope.checkpoint import set_rng_state

    x, y = torch.randn(96, 10, generator=torch.Generator().manual_seed(0)), torch.arange(96) % 2

    def loop(steps, start_state=None, stop=None):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        first = 0
        with ds.watch(model, opt) as w:
            if start_state is not None:
                model.load_state_dict(start_state["model"])
                opt.load_state_dict(start_state["optimizer"])
                w.load_state_dict(start_state["watch"])
                set_rng_state(start_state["rng"])
                first = start_state["step"]
            for step in range(first, steps):
                idx = torch.randperm(96)[:16]  # the batch order comes from the global stream
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
                w.step(loss, targets=y[idx])
                if step + 1 == stop:
                    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "watch": w.state_dict(),
                            "rng": rng_state(), "step": step + 1}
        return w

    torch.manual_seed(5)
    ref = loop(20)
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "c.safetensors", loop(20, stop=9))
    resumed = loop(20, start_state=load_checkpoint(tmp_path / "c.safetensors"))
    assert resumed.losses == ref.losses and resumed.steps == ref.steps == 20
    sa, sb = ref.stats(), resumed.stats()
    for field in STAT_FIELDS:
        assert np.array_equal(getattr(sa, field), getattr(sb, field), equal_nan=True), field
    assert [f.kind for f in resumed.findings()] == [f.kind for f in ref.findings()]
    with pytest.raises(ConfigError, match="inside"):
        ds.watch(_model()).load_state_dict({})


def test_a_stop_during_validation_waits_for_the_epoch_end(tmp_path, one_thread):
    """A SIGINT arriving in a validation pass: the pass and the epoch finish, the end-of-epoch checkpoint is
    written, and the fit stops before the next epoch (also after the last one)."""
    import signal

    from deepscope.errors import Interrupted

    class SignalInValidation(ds.Callback):
        def __init__(self, epoch):
            self.epoch = epoch

        def after_batch(self, learn):
            if not learn.training and learn.epoch == self.epoch and learn.iter == 0:
                signal.raise_signal(signal.SIGINT)

    for epoch in (0, 2):
        folder = tmp_path / f"e{epoch}"
        learn = _learner(folder, SignalInValidation(epoch))
        with pytest.raises(Interrupted) as e:
            learn.fit(3)
        assert e.value.at_batch_boundary
        assert len(learn.get_cb(MetricsCallback).history) == epoch + 1  # the epoch was finished and recorded
        stopped = learn.get_cb(Checkpoint).stopped_at
        assert stopped == folder / step_name(10 * (epoch + 1))
        assert load_checkpoint(stopped)["progress"]["epoch"] == epoch + 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in force is put back


def test_no_checkpoint_while_gradients_are_accumulating(tmp_path, one_thread):
    """Gradient accumulation (a batch cancelled after backward keeps its gradients for the next): gradients
    are not part of a checkpoint, so none is written at such a boundary, and a resume is still exact."""

    class Accumulate(ds.Callback):
        def after_backward(self, learn):
            if learn.train_iter % 2 == 0:
                raise ds.CancelBatchException()

    def learner(folder, *extra):
        return ds.Learner(_model(), _data(), lr=1e-2, cbs=[MetricsCallback(), Recorder(), Accumulate(),
                                                           Checkpoint(folder, every=1, keep_last=100), *extra])

    ref = learner(tmp_path / "ref")
    ref.fit(2)
    steps = [int(p.stem.split("-")[1]) for p in step_checkpoints(tmp_path / "ref")]
    assert steps and all(s % 2 == 0 for s in steps)  # after a stepped batch only
    with pytest.raises(KeyboardInterrupt):
        learner(tmp_path / "run", StopAfter(7)).fit(2)
    resumed = learner(tmp_path / "run")
    resumed.fit(2, resume_from=tmp_path / "run")
    assert all(torch.equal(v, w) for v, w in zip(ref.model.state_dict().values(), resumed.model.state_dict().values()))


def test_a_stop_at_any_step_gives_the_same_statistics(tmp_path, uninterrupted, one_thread):
    """A signal's checkpoint falls between the scheduled ones (every 7 steps): the record flushed there
    must still equal the uninterrupted one's, histogram bins included."""
    import signal

    class Signal(ds.Callback):
        order = 95

        def cleanup_batch(self, learn):
            if learn.training and learn.train_iter + 1 == 13:
                signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _learner(tmp_path, Signal()).fit(3)
    assert latest_checkpoint(tmp_path).name == step_name(13)
    resumed = _learner(tmp_path)
    resumed.fit(3, resume_from=tmp_path)
    _assert_same_fit(uninterrupted, resumed)


def test_other_optimizer_settings_are_refused(tmp_path, one_thread):
    _interrupted_state(tmp_path)
    other = _learner(tmp_path)
    other.opt_func = lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.5)
    with pytest.raises(CheckpointError, match=r"weight_decay: 0.01 in the checkpoint, 0.5 here"):
        other.fit(3, resume_from=tmp_path)


def test_no_checkpoint_message_tells_missing_checksums_from_none(tmp_path):
    from deepscope.recipe import no_checkpoint_message

    assert "stopped before its first one" in no_checkpoint_message(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(tmp_path / "checkpoints" / step_name(5), {"a": 1})
    (tmp_path / "checkpoints" / (step_name(5) + ".sha256")).unlink()
    text = no_checkpoint_message(tmp_path / "checkpoints")
    assert "none of the 1 checkpoints" in text and "sha256sum FILE > FILE.sha256" in text


def test_a_checkpoint_from_before_a_setting_existed_still_matches_its_run(tmp_path):
    from deepscope.config import TrainConfig
    from deepscope.errors import CheckpointError
    from deepscope.recipe import _check_same_config

    config = TrainConfig(epochs=2)
    older = {k: v for k, v in config.to_dict().items() if k not in ("compile", "replay")}  # written by an older version
    _check_same_config({"extra": {"config": older}}, config, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="replay: True in the checkpoint, False in config.json"):
        _check_same_config({"extra": {"config": older}}, TrainConfig(epochs=2, replay=False), tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="lr: 0.01 in the checkpoint, 0.5 in config.json"):
        _check_same_config({"extra": {"config": older}}, TrainConfig(epochs=2, lr=0.5), tmp_path / "c.safetensors")


def test_resume_of_a_checkpoint_file_says_it_takes_the_run_folder(tmp_path, capsys):
    from deepscope.cli import main

    (tmp_path / "step-00000004.safetensors").write_bytes(b"")
    assert main(["train", "--resume", str(tmp_path / "step-00000004.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is a file; --resume takes the folder of the interrupted run" in err and "resume_from=FILE" in err


@pytest.mark.parametrize("signum, launched, advice", [
    (2, False, "press Ctrl-C again to stop at once"), (15, False, "Ctrl-C stops at once"),
    (2, True, "to stop at once, kill the job")])  # under torchrun a second Ctrl-C arrives as SIGTERM
def test_the_stop_line_says_how_to_stop_at_once(signum, launched, advice, monkeypatch):
    from deepscope import distributed, errors

    monkeypatch.setattr(distributed, "launched", lambda: launched)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    said = []
    try:
        errors.stops_at_boundaries(say=said.append)._handler(signum, None)
    finally:
        errors.clear_pending_interrupt()
    assert len(said) == 1 and said[0].endswith(f"writing a checkpoint ({advice})"), said


def test_a_resumed_epoch_counts_the_seconds_it_ran_before_the_stop():
    import time

    from deepscope.callbacks import MetricsCallback

    before = MetricsCallback()
    before.before_epoch(None)
    before._started -= 5.0  # the epoch has run 5 s when the checkpoint is taken, mid-epoch
    state = before.state_dict()
    after = MetricsCallback()
    after.before_epoch(None)  # the resumed epoch starts (Learner: before_epoch, then load_state_dict)
    after.load_state_dict(state)
    assert 5.0 <= time.perf_counter() - after._started < 6.0
    before._in_epoch = False  # at an epoch's end the next epoch starts afresh
    fresh = MetricsCallback()
    fresh.before_epoch(None)
    fresh.load_state_dict(before.state_dict())
    assert time.perf_counter() - fresh._started < 1.0
