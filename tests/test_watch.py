"""`deepscope.watch` in a plain PyTorch loop: the same engine and the same numbers as the Learner's
ActivationStats, hooks that always go, steps from the optimiser or from `w.step`, and statistics checked
against a direct computation."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import deepscope
from deepscope import ActivationStats, DataLoaders, Learner
from deepscope.errors import ConfigError


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n: int = 6, bs: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n * bs, 10, generator=g)
    y = torch.randint(0, 3, (n * bs,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n * bs, bs)]


def plain_loop(model, data, w=None, *, call_step=True, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in data:
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if w is not None and call_step:
            w.step(loss, targets=yb)
    return opt


@pytest.mark.parametrize("subsample", [None, 64])
@pytest.mark.parametrize("call_step", [True, False])
def test_watch_gives_the_learners_statistics(subsample, call_step, one_thread):
    data = batches()
    model = mlp()
    learner_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt, subsample=subsample) as w:
        plain_loop(model, data, w, call_step=call_step, opt=opt)
    stats_cb = ActivationStats(subsample=subsample)
    learn = Learner(learner_model, DataLoaders(data, None), nn.functional.cross_entropy, lr=0.1,
                    opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr), cbs=[stats_cb])
    learn.fit(1)
    a, b = w.stats(), stats_cb.stats()
    assert a.modules == b.modules and a.param_modules == b.param_modules
    assert a.steps.tolist() == b.steps.tolist() == list(range(len(data)))
    for field in ("act_mean", "act_std", "act_dead", "act_hist", "grad_norm", "grad_std", "weight_norm",
                  "param_grad_norm", "update_ratio"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, err_msg=field)
    assert w.steps == len(data)


def test_statistics_equal_a_direct_computation(one_thread):
    model, data = mlp(), batches(n=3)
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = []
    flat = lambda: torch.cat([model[2].weight.detach().flatten(), model[2].bias.detach().flatten()])  # noqa: E731
    pre = opt.register_step_pre_hook(lambda *a: before.append(flat().clone()))
    with deepscope.watch(model, opt, subsample=None) as w:
        plain_loop(model, data, w, opt=opt)
    handle.remove()
    pre.remove()
    s = w.stats()
    i, j = s.modules.index("1"), s.param_modules.index("2")
    for step, out in enumerate(seen):
        assert s.act_mean[step, i] == pytest.approx(out.mean().item(), rel=1e-5, abs=1e-7)
        assert s.act_std[step, i] == pytest.approx(out.std().item(), rel=1e-4)
        assert s.act_dead[step, i] == pytest.approx((out.abs() <= 1e-3).float().mean().item())
    # parameters of the last step: the weights it ran with, and the update it made
    assert s.weight_norm[-1, j] == pytest.approx(before[-1].norm().item(), rel=1e-5)
    assert s.update_ratio[-1, j] == pytest.approx(((flat() - before[-1]).norm() / before[-1].norm()).item(), rel=1e-4)


def test_without_an_optimizer_w_step_counts_the_steps_and_parameters_are_not_measured(one_thread):
    model, data = mlp(), batches(n=4)
    with deepscope.watch(model) as w:
        plain_loop(model, data, w)
    s = w.stats()
    assert s.steps.tolist() == [0, 1, 2, 3]
    assert np.isnan(s.update_ratio).all(), "no optimiser: no update to measure"
    assert np.isfinite(s.grad_norm).all()
    assert len(w.losses) == 4 and all(np.isfinite(w.losses))


def test_gradient_accumulation_is_one_step(one_thread):
    model, data = mlp(), batches(n=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt) as w:
        for k in range(0, 4, 2):
            opt.zero_grad()
            for xb, yb in data[k:k + 2]:  # two micro-batches per optimiser step
                nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    assert w.steps == 2 and w.stats().steps.tolist() == [0, 1]


def test_a_module_called_twice_is_recorded_at_its_first_call(one_thread):
    act = nn.Tanh()
    lin = nn.Linear(8, 8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = lin, act

        def forward(self, x):
            return self.act(self.lin(self.act(x)))  # the same activation object, called twice

    model = Twice()
    x = torch.randn(16, 8)
    first = {}

    def keep_first(m, i, o):
        if "out" not in first:
            first["out"] = o
            o.retain_grad()

    handle = act.register_forward_hook(keep_first)
    with deepscope.watch(model, subsample=None) as w:
        model(x.requires_grad_()).pow(2).sum().backward()
        w.step()
    handle.remove()
    s = w.stats()
    i = s.modules.index("act")
    out = first["out"]
    assert s.act_mean[0, i] == pytest.approx(out.mean().item(), rel=1e-5)
    assert s.grad_norm[0, i] == pytest.approx(out.grad.norm().item(), rel=1e-5), "gradient of the same call"


def test_hooks_go_at_exit_even_on_an_error(one_thread):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        with deepscope.watch(model, opt):
            plain_loop(model, batches(n=1), opt=opt)
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_eval_forwards_are_not_training_steps(one_thread):
    model, data = mlp(), batches(n=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt) as w:
        plain_loop(model, data, opt=opt)
        model.eval()
        with torch.no_grad():
            model(data[0][0])
    assert w.steps == 2


def test_findings_and_a_report_without_a_run_folder(tmp_path, one_thread):
    model, data = mlp(), batches(n=12)
    opt = torch.optim.SGD(model.parameters(), lr=1e6)  # diverges
    with deepscope.watch(model, opt) as w:
        plain_loop(model, data, w, opt=opt)
    kinds = {f.kind for f in w.findings()}
    assert "diverged" in kinds
    path = w.report(tmp_path)
    html = path.read_text()
    assert path == tmp_path / "report.html" and "data:image/png;base64" in html and "diverged" in html
    assert "http://" not in html and "https://" not in html.replace("https://github.com", "")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="nn.Module"):
        deepscope.watch("not a model")
    with pytest.raises(ConfigError, match="no module of the model matches"):
        with deepscope.watch(mlp(), modules=["nope"]):
            pass
    with pytest.raises(ConfigError, match="every"):
        deepscope.watch(mlp(), every=0)


def test_report_path_rules_and_settings(tmp_path, one_thread, monkeypatch):
    import deepscope.report

    model, data = mlp(), batches(n=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    with deepscope.watch(model, opt) as w:
        plain_loop(model, data, w, opt=opt)
    with monkeypatch.context() as m:  # where the page goes needs no drawing: a stand-in page for these two
        m.setattr(deepscope.report, "render_run", lambda run: "<html>stand-in</html>")
        assert w.report(tmp_path / "new" / "folder") == tmp_path / "new" / "folder" / "report.html"
        assert w.report(tmp_path / "mine.html") == tmp_path / "mine.html"
        assert w.report(tmp_path / "not" / "yet" / "a.html") == tmp_path / "not" / "yet" / "a.html"  # folders made
    assert (tmp_path / "new" / "folder" / "report.html").is_file() and (tmp_path / "mine.html").is_file()
    assert (tmp_path / "not" / "yet" / "a.html").is_file()
    html = w.report(tmp_path / "x.html", config={"batch_size": 16}).read_text()
    for text in ("AdamW", "0.003", "0.05", "batch_size"):
        assert text in html, text
    settings = w.settings()
    assert settings["optimizer"] == "AdamW" and settings["lr"] == 3e-3 and "foreach" not in settings


def test_attention_is_watched_whole_by_default(one_thread):
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    with deepscope.watch(layer) as w:
        layer(torch.randn(2, 5, 8)).sum().backward()
        w.step()
    s = w.stats()
    assert "self_attn" in s.modules and "self_attn.out_proj" not in s.modules
    assert s.notes() == {}, "every default module ran"
    assert np.isfinite(s.act_mean[0, s.modules.index("self_attn")])


def test_closure_optimisers_get_parameter_statistics(one_thread):
    model, (xb, yb) = mlp(), batches(n=1)[0]
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    before = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    with deepscope.watch(model, opt, subsample=None) as w:
        for _ in range(3):
            before.append(torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach().flatten()]))
            opt.step(closure)
    s = w.stats()
    j = s.param_modules.index("0")
    assert s.steps.tolist() == [0, 1, 2]
    assert np.isfinite(s.update_ratio).all() and np.isfinite(s.act_mean).all()
    for k in range(3):  # the weights each step started from, and the update it made
        assert s.weight_norm[k, j] == pytest.approx(before[k].norm().item(), rel=1e-5)
    after = torch.cat([model[0].weight.detach().flatten(), model[0].bias.detach().flatten()])
    assert s.update_ratio[2, j] == pytest.approx(((after - before[2]).norm() / before[2].norm()).item(), rel=1e-4)


def test_a_model_without_submodules_is_watched_whole(one_thread):
    model = nn.Linear(10, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt) as w:
        plain_loop(model, batches(n=2), w, opt=opt)
    s = w.stats()
    assert s.modules == [""] and s.param_modules == [""] and np.isfinite(s.update_ratio).all()


def test_a_no_grad_forward_in_train_mode_is_not_a_step(one_thread):
    model, data = mlp(), batches(n=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt, subsample=None) as w:
        for xb, yb in data:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
            with torch.no_grad():
                model(xb[:2])  # a quick look, still in train mode
    s = w.stats()
    assert w.steps == 3 and s.steps.tolist() == [0, 1, 2]
    assert np.isfinite(s.grad_norm).all(), "every recorded step is a real training step"


def test_an_entry_of_modules_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="nope"):
        with deepscope.watch(mlp(), modules=["0", "nope"]):
            pass


def test_a_step_cut_short_by_an_error_is_dropped_and_a_new_with_starts_afresh(one_thread):
    model, data = mlp(), batches(n=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = deepscope.watch(model, opt)
    with pytest.raises(RuntimeError):
        with w:
            plain_loop(model, data[:2], w, opt=opt)
            model(data[2][0])  # the third step's forward, then a crash before its backward
            raise RuntimeError("crash")
    assert w.stats().steps.tolist() == [0, 1] and len(w.losses) == 2
    with w:
        plain_loop(model, data[:1], w, opt=opt)
    assert w.stats().steps.tolist() == [0] and len(w.losses) == 1 and w.steps == 1


# --- loss_shape_mismatch in a plain loop, and the Learner's targets -----------------------------------------------
class LSTMRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 8, batch_first=True), nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


REGRESSORS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1)),
            lambda g: torch.randn(16, 10, generator=g)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 1)), lambda g: torch.randn(16, 1, 6, 6, generator=g)),
    "lstm": (LSTMRegressor, lambda g: torch.randn(16, 5, 3, generator=g)),
}


def regression_loop(arch: str, *, column_targets: bool, squeeze: bool = False, steps: int = 3):
    torch.manual_seed(0)
    make, inputs = REGRESSORS[arch]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    with deepscope.watch(model, opt) as w:
        for _ in range(steps):
            xb, yb = inputs(g), torch.randn(16, generator=g)
            yb = yb[:, None] if column_targets else yb
            pred = model(xb)
            loss = nn.functional.mse_loss(pred.squeeze(-1) if squeeze else pred, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=yb)
    return {f.kind: f for f in w.findings()}


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("arch", list(REGRESSORS))
def test_predictions_broadcast_against_targets_in_the_loss(arch, one_thread):
    f = regression_loop(arch, column_targets=False)["loss_shape_mismatch"]  # (16, 1) against (16,): (16, 16)
    assert f.severity == "error" and f.evidence["broadcast_shape"] == [16, 16]
    assert f.evidence["loss_pairs"] == "broadcast", "the loss's value is the error over all 256 pairs"
    assert "(16, 1)" in f.message and "(16,)" in f.message and "squeeze(-1)" in f.fix


@pytest.mark.parametrize("arch", list(REGRESSORS))
def test_matching_prediction_and_target_shapes_are_fine(arch, one_thread):
    assert "loss_shape_mismatch" not in regression_loop(arch, column_targets=True)
    # (16, 1) outputs and (16,) targets, squeezed in the loop before the loss: the loss's value shows it
    assert "loss_shape_mismatch" not in regression_loop(arch, column_targets=False, squeeze=True)


def test_class_index_targets_against_logits_are_fine(one_thread):
    model, data = mlp(), batches(n=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with deepscope.watch(model, opt) as w:
        plain_loop(model, data, w, opt=opt)  # (16, 3) logits, (16,) int64 targets
    assert "loss_shape_mismatch" not in {f.kind for f in w.findings()}
    assert w.stats().observations["targets_seen"] == 3


def test_the_learner_gives_its_batches_targets_to_the_loop_checks(one_thread):
    from deepscope.diagnose.loop import analyse_loop

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24 * 16, 10, generator=g), torch.arange(24 * 16) * 3 // (24 * 16)  # sorted by label
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    stats_cb = ActivationStats()
    learn = Learner(mlp(), DataLoaders(data, data[:2]), nn.functional.cross_entropy, lr=0.1,
                    opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr), cbs=[stats_cb])
    learn.fit(1)
    obs = stats_cb.stats().observations
    assert obs["targets_seen"] == obs["label_batches"] == 24, "training batches only, not the validation ones"
    assert "unshuffled_batches" in {f.kind for f in analyse_loop(obs)}
