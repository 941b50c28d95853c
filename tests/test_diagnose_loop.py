"""The silent bugs of hand-written training loops, through `watch` in a plain loop: each new kind has a
defect case and a healthy case on three architectures (an MLP with BatchNorm and Dropout, a small CNN, an
LSTM classifier), and the pure checks are tested on plain dictionaries."""
import pytest
import torch
from torch import nn

import deepscope
from deepscope.diagnose.loop import analyse_loop


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(10, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


ARCHS = {"mlp": (mlp, lambda g: torch.randn(16, 6, generator=g)),
         "cnn": (cnn, lambda g: torch.randn(16, 1, 6, 6, generator=g)),
         "lstm": (LSTMNet, lambda g: torch.randint(0, 10, (16, 5), generator=g))}


def train(arch: str, *, steps: int = 6, eval_mode=False, zero=True, late_layer=False, accumulate=1):
    torch.manual_seed(0)
    make, inputs = ARCHS[arch]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if late_layer:  # a layer added after the optimizer was made
        model.extra = nn.Linear(3, 3)
        forward = model.forward
        model.forward = lambda x: model.extra(forward(x))
    g = torch.Generator().manual_seed(1)
    with deepscope.watch(model, opt) as w:
        if eval_mode:
            model.eval()  # validation that never switched back
        for _ in range(steps):
            if zero:
                opt.zero_grad()
            for _ in range(accumulate):
                loss = nn.functional.cross_entropy(model(inputs(g)), torch.randint(0, 3, (16,), generator=g))
                loss.backward()
            opt.step()
            w.step(loss)
    return {f.kind: f for f in w.findings()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_healthy_loops_report_none_of_these(arch, one_thread):
    kinds = train(arch, accumulate=2)  # gradient accumulation is a healthy loop too
    assert not {"model_in_eval_mode", "params_not_in_optimizer", "gradients_not_zeroed"} & set(kinds), kinds


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_never_zeroed(arch, one_thread):
    f = train(arch, zero=False)["gradients_not_zeroed"]
    assert f.severity == "error" and f.evidence["stale_gradients"] >= f.evidence["gradient_checks"] - 1


@pytest.mark.parametrize("arch", ["mlp", "cnn"])  # the LSTM net has no BatchNorm or Dropout
def test_training_in_eval_mode(arch, one_thread):
    f = train(arch, eval_mode=True)["model_in_eval_mode"]
    assert f.evidence["eval_updates"] == f.evidence["updates"] == 6


def test_the_lstm_in_eval_mode_is_the_model_in_eval_mode(one_thread):
    f = train("lstm", eval_mode=True)["model_in_eval_mode"]
    assert "the model" in f.message


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_layer_the_optimizer_does_not_hold(arch, one_thread):
    f = train(arch, late_layer=True)["params_not_in_optimizer"]
    assert f.module == "extra" and f.evidence["modules"] == ["extra"]


def test_the_checks_on_plain_observations():
    assert analyse_loop(None) == [] and analyse_loop({}) == []
    healthy = {"updates": 10, "eval_updates": 0, "not_in_optimizer": [], "gradient_checks": 9, "stale_gradients": 0}
    assert analyse_loop(healthy) == []
    assert analyse_loop({**healthy, "gradient_checks": 2, "stale_gradients": 2}) == [], "too few updates to judge"
    assert [f.kind for f in analyse_loop({**healthy, "stale_gradients": 9})] == ["gradients_not_zeroed"]


def test_gradient_explosion_on_plain_arrays():
    import numpy as np

    from deepscope.diagnose.history import check_gradient_explosion

    steps = np.arange(40)
    flat = np.ones(40)
    grows = np.r_[np.ones(10), np.logspace(0, 4, 30)]       # x1e4 by the end, passing 10x at step ~17
    later = np.r_[np.ones(20), np.logspace(0, 4, 20)]       # starts later
    (f,) = check_gradient_explosion(["a", "b", "c"], steps, np.c_[flat, later, grows])
    assert f.module == "c" and f.evidence["exploding"] == ["b", "c"] and 10 < f.evidence["onset_step"] < 25
    assert check_gradient_explosion(["a"], steps, np.c_[np.logspace(0, -2, 40)]) == [], "falling is healthy"
    assert check_gradient_explosion(["a"], steps, np.c_[np.r_[np.ones(30), np.full(10, np.nan)]]) != [], "to NaN"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_healthy_runs_have_no_gradient_explosion(arch, one_thread):
    assert "gradient_explosion" not in train(arch, steps=30)


def test_a_learning_rate_past_the_stable_range_explodes_the_gradients(one_thread):
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.5)  # past 2 / (largest curvature): each step overshoots more
    x = torch.randn(256, 10)
    y = x @ torch.randn(10, 1)
    with deepscope.watch(model, opt) as w:
        for i in range(0, 30):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss)
    f = {f.kind: f for f in w.findings()}["gradient_explosion"]
    assert f.module == "" and f.evidence["late_norm"] > 1e3 * f.evidence["early_norm"]


class SoftmaxNet(nn.Module):
    def __init__(self, dim: int, log: bool = False):
        super().__init__()
        self.body, self.dim, self.log = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), dim, log

    def forward(self, x):
        z = self.body(x)
        return z.log_softmax(self.dim) if self.log else z.softmax(self.dim)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim, wrong", [(0, True), (1, False), (-1, False)])
def test_softmax_over_the_batch_is_found_by_watch_and_by_diagnose(dim, wrong, log, one_thread):
    from deepscope import diagnose

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    loss_fn = nn.functional.nll_loss if log else nn.functional.cross_entropy
    model = SoftmaxNet(dim, log)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with deepscope.watch(model, opt) as w:
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=yb)
    assert ("softmax_wrong_dim" in {f.kind for f in w.findings()}) == wrong
    assert ("softmax_wrong_dim" in {f.kind for f in diagnose(SoftmaxNet(dim, log), batches, loss_fn, steps=2)}) == wrong
