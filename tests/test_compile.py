"""torch.compile: the `Compile` callback (and `train --compile`) trains as eager does, with the statistics of
eager; deepscope's hooks stay out of the compiled graph and are seen even when added after compiling.

The compiler under test is a counting backend (TorchDynamo's graph capture, then the captured FX graph run as
it is), so these tests check the capture and the plumbing in seconds; Inductor's kernels are its own business.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn

import deepscope as ds
from deepscope.callbacks import Compile, CompiledStep, MetricsCallback, MixedPrecision, Recorder
from deepscope.cli import main
from deepscope.config import TrainConfig
from deepscope.data import DataLoaders, TensorBatches
from deepscope.errors import ConfigError
from deepscope.learner import TrainStep

dynamo = pytest.importorskip("torch._dynamo")
pytestmark = pytest.mark.skipif(not dynamo.is_dynamo_supported(), reason="TorchDynamo does not run on this Python")


class Graphs:
    """A torch.compile backend that keeps the size of each graph it is given and runs it as captured."""

    def __init__(self):
        self.sizes = []

    def __call__(self, gm, example_inputs):
        self.sizes.append(len(gm.graph.nodes))
        return gm.forward


def data(n=192, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    return DataLoaders(TensorBatches(x[:160], y[:160], bs, shuffle=True, generator=torch.Generator().manual_seed(1)),
                       TensorBatches(x[160:], y[160:], 64), n_classes=2)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def fit(cbs, epochs=2, net=None):
    learn = ds.Learner(net or model(), data(), nn.functional.cross_entropy, lr=0.05,
                       cbs=[MetricsCallback(), Recorder(), *cbs])
    learn.fit(epochs)
    return learn


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()  # no graph compiled by another test is reused here
    yield
    dynamo.reset()


def test_compiled_training_equals_eager_with_the_same_statistics():
    eager = fit([ds.ActivationStats(subsample=None)])
    graphs = Graphs()
    compiled = fit([Compile(graphs), ds.ActivationStats(subsample=None)])
    assert graphs.sizes, "the forward pass never went through the compiler"
    for (name, a), (name_b, b) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items()):
        assert name == name_b and "_orig_mod" not in name_b  # the model itself stays the eager module
        assert torch.allclose(a, b, atol=1e-6), name
    for ra, rb in zip(eager.get_cb(MetricsCallback).history, compiled.get_cb(MetricsCallback).history):
        assert ra["valid_loss"] == pytest.approx(rb["valid_loss"], abs=1e-6)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
    se, sc = eager.get_cb(ds.ActivationStats).stats(), compiled.get_cb(ds.ActivationStats).stats()
    assert se.modules == sc.modules and not any("_orig_mod" in m for m in sc.modules)
    for key in ("act_mean", "act_std", "act_dead", "act_hist", "grad_norm", "grad_mean"):
        assert np.allclose(getattr(se, key), getattr(sc, key), rtol=1e-5, atol=1e-7, equal_nan=True), key
    assert type(compiled.train_step) is TrainStep  # the compiled step is taken off at the end of the fit
    assert compiled.model is not None and type(compiled.model) is nn.Sequential


def test_hooks_cut_the_graph_at_watched_modules_and_nothing_recompiles_per_step():
    whole = Graphs()
    fit([Compile(whole)], epochs=3)
    assert len(whole.sizes) == 2  # one graph for training, one for validation (eval mode): the whole forward each
    cut = Graphs()
    fit([Compile(cut), ds.ActivationStats()], epochs=1)
    first = len(cut.sizes)
    assert first > len(whole.sizes) and max(cut.sizes) < max(whole.sizes)  # cut at the hooked modules
    dynamo.reset()
    again = Graphs()
    fit([Compile(again), ds.ActivationStats()], epochs=3)
    assert len(again.sizes) == first  # more epochs, the same graphs: no step recompiles


def test_hooks_added_after_compiling_are_seen():
    with dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default
        learn = fit([Compile(Graphs())], epochs=1)  # compiled with no hook on the model
        learn.add_cbs([ds.ActivationStats()])
        learn.fit(1)
    s = learn.get_cb(ds.ActivationStats).stats()
    assert len(s.steps) == 5 and np.isfinite(s.act_mean).all() and np.isfinite(s.grad_norm).all()


def test_watch_records_a_model_the_user_compiled():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
    for watched in ("module", "compiled"):
        dynamo.config.skip_nnmodule_hook_guards = True  # torch's default: not guarding on hooks
        dynamo.reset()
        net = model()
        compiled = torch.compile(net, backend=Graphs())
        compiled(x[:4])  # compiled before any hook exists
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        with ds.watch(net if watched == "module" else compiled, opt) as w:
            for _ in range(3):
                loss = nn.functional.cross_entropy(compiled(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        s = w.stats()
        assert s.modules == ["0", "1", "2", "3", "4"], watched  # no `_orig_mod.` prefix
        assert w.settings()["model"] == "Sequential", watched  # the model inside, not OptimizedModule
        assert len(s.steps) == 3 and np.isfinite(s.act_mean).all() and np.isfinite(s.grad_norm).all(), watched


def test_compile_composes_with_mixed_precision():
    graphs = Graphs()
    learn = fit([Compile(graphs), MixedPrecision(torch.bfloat16)], epochs=1)
    assert graphs.sizes and np.isfinite(learn.get_cb(MetricsCallback).history[-1]["valid_loss"])
    assert type(learn.train_step) is TrainStep


def test_a_failing_compiler_is_a_clear_error():
    def broken(gm, example_inputs):
        raise RuntimeError("no kernels today")

    with pytest.raises(ConfigError, match="torch.compile .backend .broken.. could not compile the forward pass at training step 0: RuntimeError: no kernels today; .*drop --compile"):
        fit([Compile(broken)], epochs=1)


def test_unknown_backends_are_refused_before_training(capsys):
    with pytest.raises(ConfigError, match="unknown torch.compile backend 'nope'; choose one of .*inductor"):
        Compile("nope")
    with pytest.raises(ConfigError, match="unknown torch.compile backend"):
        TrainConfig(compile="nope")
    assert main(["train", "--compile", "nope", "--epochs", "1"]) == 2
    assert "unknown torch.compile backend 'nope'" in capsys.readouterr().err


def test_train_compile_flag(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(tiny_data), "--out", str(out), "--no-verify", "--epochs", "1",
                 "--batch-size", "32", "--nfs", "4", "8", "--device", "cpu", "--compile", "aot_eager", "--quiet",
                 "--no-report", "--sync-batchnorm"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "--sync-batchnorm has no effect in a single process" in err  # said, not silently accepted
    assert json.loads((out / "config.json").read_text())["config"]["compile"] == "aot_eager"
    from deepscope.stats import load_stats

    assert load_stats(out / "stats.npz").modules[0] == "block0.conv"  # the eager model's names
    from deepscope.cli.train import add_parser  # --compile alone means Inductor
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["train", "--compile"]).compile == "inductor"
    assert parser.parse_args(["train"]).compile is None
    # --no-replay: no NaN read-back inside a step (a GPU sync), so no exact replay either
    from deepscope.diagnose import Diagnose
    from deepscope.recipe import looking_inside_callbacks

    assert parser.parse_args(["train", "--no-replay"]).replay is False and parser.parse_args(["train"]).replay
    for replay in (True, False):
        cbs = looking_inside_callbacks(TrainConfig(replay=replay), None)
        assert next(c for c in cbs if isinstance(c, Diagnose)).replay is replay
    assert isinstance(CompiledStep(TrainStep()), TrainStep)


def test_lr_find_sweeps_compiled_as_train_would(tiny_data, tmp_path, capsys, monkeypatch):
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(kw["backend"]) or real(module, **kw))
    out = tmp_path / "lr"
    code = main(["lr-find", "--data-dir", str(tiny_data), "--out", str(out), "--no-verify", "--batch-size", "16",
                 "--nfs", "4", "--device", "cpu", "--num-it", "6", "--compile", "aot_eager"])
    assert code in (0, 1), capsys.readouterr().err  # 1: too few points for a suggestion, which is fine here
    assert json.loads((out / "config.json").read_text())["config"]["compile"] == "aot_eager"
    assert len(json.loads((out / "lr_find.json").read_text())["lrs"]) >= 2
    assert compiled and set(compiled) == {"aot_eager"}  # the sweep's forward pass went through torch.compile
