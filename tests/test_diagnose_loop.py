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


def test_eval_mode_that_changes_nothing_is_not_a_finding(one_thread):
    """This LSTM net has no BatchNorm, Dropout or dropout between LSTM layers: in eval mode it computes what
    it would in train mode, so training it that way is no bug."""
    assert "model_in_eval_mode" not in train("lstm", eval_mode=True)


def test_frozen_batchnorm_in_eval_mode_is_deliberate_and_dropout_is_not(one_thread):
    from deepscope.stats.loop import LoopObserver

    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
    model = nn.Sequential(backbone, nn.Dropout(0.5), nn.Linear(8, 2))
    backbone.requires_grad_(False)
    backbone.eval()                      # fine-tuning a frozen backbone: its statistics are frozen on purpose
    observer = LoopObserver(model)
    observer.on_update()
    assert observer.observations()["eval_updates"] == 0
    model[1].eval()                      # Dropout off while training: a bug
    observer.on_update()
    assert observer.observations()["eval_modules"] == ["1"]
    model.eval()                         # the whole model, Dropout included
    fresh = LoopObserver(model)
    fresh.on_update()
    assert fresh.observations()["eval_modules"] == ["", "1"]


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
    # growing, then NaN: an explosion, judged on its last finite norms
    assert check_gradient_explosion(["a"], steps, np.c_[np.r_[np.ones(5), np.logspace(0, 5, 25), np.full(10, np.nan)]])
    # flat, then NaN at once: a NaN made elsewhere (a module's forward, the loss), which the NaN checks report
    assert check_gradient_explosion(["a"], steps, np.c_[np.r_[np.ones(30), np.full(10, np.nan)]]) == []
    # a burst: one step at 5,000x the early level (a recurrent net without clipping), back to normal after
    burst = np.ones(40)
    burst[30] = 5000.0
    (b,) = check_gradient_explosion(["gru"], steps, np.c_[burst])
    assert b.module == "gru" and b.evidence["late_norm"] == 5000.0
    # tiny gradients of a collapsed network growing back are not an explosion (below GRAD_EXPLOSION_FLOOR)
    assert check_gradient_explosion(["a"], steps, np.c_[np.logspace(-11, -7, 40)]) == []


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


# --- unshuffled_batches ---------------------------------------------------------------------------------------
def classifier(arch: str, n_classes: int) -> nn.Module:
    return nn.Sequential(ARCHS[arch][0](), nn.ReLU(), nn.Linear(3, n_classes))


def dataset_inputs(arch: str, n: int, g: torch.Generator) -> torch.Tensor:
    return {"mlp": lambda: torch.randn(n, 6, generator=g), "cnn": lambda: torch.randn(n, 1, 6, 6, generator=g),
            "lstm": lambda: torch.randint(0, 10, (n, 5), generator=g)}[arch]()


def train_classes(arch: str, n_classes: int, batch_size: int, *, ordered: bool, steps: int = 24, targets=True,
                  dtype=torch.int64):
    """A plain loop over a torch DataLoader, shuffled or over a dataset sorted by label (shuffle=False)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = steps * batch_size
    y = torch.arange(n) * n_classes // n if ordered else torch.randint(0, n_classes, (n,), generator=g)
    loader = DataLoader(TensorDataset(dataset_inputs(arch, n, g), y), batch_size=batch_size, shuffle=not ordered,
                        generator=g)
    model = classifier(arch, n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with deepscope.watch(model, opt) as w:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.step(loss, targets=yb.to(dtype) if targets else None)
    return w


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("n_classes, batch_size", [(10, 32), (2, 16)])
def test_shuffled_class_batches_are_not_unshuffled(arch, n_classes, batch_size, one_thread):
    w = train_classes(arch, n_classes, batch_size, ordered=False)
    assert w.stats().observations["label_batches"] == 24, "the check did run"
    assert "unshuffled_batches" not in {f.kind for f in w.findings()}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("n_classes, batch_size", [(10, 32), (2, 16)])
def test_data_sorted_by_label_is_unshuffled(arch, n_classes, batch_size, one_thread):
    f = {f.kind: f for f in train_classes(arch, n_classes, batch_size, ordered=True).findings()}["unshuffled_batches"]
    assert f.severity == "error" and "shuffle=True" in f.fix
    assert f.evidence["median_batch_classes"] == 1 and f.evidence["run_classes"] == n_classes
    assert f.evidence["expected_shuffled_classes"] > 1.9 and f.evidence["label_order"] == "rises"
    assert f"1 of the run's {n_classes} classes" in f.message


def test_uint8_class_targets_are_observed_and_regression_or_missing_targets_are_not_judged(one_thread):
    f = {f.kind: f for f in train_classes("mlp", 10, 32, ordered=True, dtype=torch.uint8).findings()}
    assert "unshuffled_batches" in f
    regression = train_classes("mlp", 10, 32, ordered=True, dtype=torch.float32)  # sorted float targets
    obs = regression.stats().observations
    assert (obs["targets_seen"], obs["other_targets"], obs["label_batches"]) == (24, 24, 0)
    assert "unshuffled_batches" not in {f.kind for f in regression.findings()}
    untold = train_classes("mlp", 10, 32, ordered=True, targets=False)
    assert untold.stats().observations["targets_seen"] == 0, "no targets: the check did not run"
    assert "unshuffled_batches" not in {f.kind for f in untold.findings()}


def _label_obs(batches: list[list[int]]) -> dict:
    counts = {}
    for b in batches:
        for c in b:
            counts[c] = counts.get(c, 0) + 1
    return {"targets_seen": len(batches), "label_batches": len(batches),
            "batch_classes": [len(set(b)) for b in batches],
            "batch_label_means": [sum(b) / len(b) for b in batches], "batch_sizes": [len(b) for b in batches],
            "class_counts": sorted(counts.values(), reverse=True)}


def test_unshuffled_batches_on_plain_observations():
    from deepscope.diagnose.loop import check_batch_shuffling

    g = torch.Generator().manual_seed(0)
    shuffled = [torch.randint(0, 10, (32,), generator=g).tolist() for _ in range(30)]
    assert check_batch_shuffling(_label_obs(shuffled)) == []
    ordered = sorted(c for b in shuffled for c in b)
    sorted_batches = [ordered[i:i + 32] for i in range(0, len(ordered), 32)]
    (f,) = check_batch_shuffling(_label_obs(sorted_batches))
    assert f.kind == "unshuffled_batches" and f.evidence["median_batch_classes"] <= 2
    assert check_batch_shuffling(_label_obs(sorted_batches[:19])) == [], "too few batches to judge"
    assert check_batch_shuffling({"targets_seen": 0}) == [] and check_batch_shuffling({}) == []
    # two classes, all 0s then all 1s, over two epochs: one class per batch and a rising label
    binary = ([[0] * 16] * 12 + [[1] * 16] * 12) * 2
    (f,) = check_batch_shuffling(_label_obs(binary))
    assert f.evidence["run_classes"] == 2 and f.evidence["label_order"] == "rises"
    # ...but batches of one class each in random order (one user's data per batch) are not "sorted"
    groups = [[int(torch.randint(0, 2, (), generator=g))] * 16 for _ in range(48)]
    assert check_batch_shuffling(_label_obs(groups)) == []
    # many classes per batch still count as unshuffled when the labels arrive sorted
    many = list(range(100)) * 8
    many.sort()
    (f,) = check_batch_shuffling(_label_obs([many[i:i + 32] for i in range(0, len(many), 32)]))
    assert f.evidence["median_batch_classes"] > 2 and f.evidence["label_order_share"] == 1.0
    # tiny batches of a shuffled 10-class run hold 1-2 classes by nature
    pairs = [torch.randint(0, 10, (2,), generator=g).tolist() for _ in range(60)]
    assert check_batch_shuffling(_label_obs(pairs)) == []
    assert [x.kind for x in analyse_loop({**_label_obs(sorted_batches), "updates": 30})] == ["unshuffled_batches"]
