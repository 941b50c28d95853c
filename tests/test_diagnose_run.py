"""diagnose() end to end: each defect built for real is found and named; healthy models are not flagged."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from deepscope.data import DataLoaders, TensorBatches
from deepscope.diagnose import NONFINITE_BATCH_FILE, diagnose, problems
from test_diagnose_fixtures import BS, C, D, N, healthy_cnn, healthy_mlp, image_batches, make_batches, plain_mlp


pytestmark = pytest.mark.usefixtures("one_thread")


def found(findings, kind):
    return [f for f in findings if f.kind == kind]


def no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- healthy models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_model, batches", [(healthy_mlp, make_batches), (healthy_cnn, image_batches)])
def test_healthy_model_has_no_problems(make_model, batches):
    findings = diagnose(make_model(), batches())
    assert problems(findings) == [], findings


def test_accepts_dataloader_and_dataloaders():
    x, y = torch.cat([b[0] for b in make_batches()]), torch.cat([b[1] for b in make_batches()])
    assert problems(diagnose(healthy_mlp(), DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=True))) == []
    generator = torch.Generator().manual_seed(1)
    dls = DataLoaders(TensorBatches(x, y, BS, shuffle=True, generator=generator), TensorBatches(x, y, 2 * BS), n_classes=C)
    state = generator.get_state()
    assert problems(diagnose(healthy_mlp(), dls, steps=10)) == []
    assert torch.equal(generator.get_state(), state)  # the user's shuffling order is not advanced


def test_user_model_rng_and_hooks_are_untouched():
    model = healthy_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train(False)
    diagnose(model, make_batches(), lr=1.0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert no_hooks(model) and model.training is False
    assert torch.equal(torch.get_rng_state(), rng)


# --- NaN / Inf -----------------------------------------------------------------------------------------------
class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)  # NaN for negative inputs


class SqrtRelu(nn.Module):
    """Finite forward (sqrt(0) = 0) but an infinite derivative at 0: 0 * inf = NaN in the backward pass."""

    def forward(self, x):
        return torch.sqrt(x * (x > 0))


class DivideByZeroGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad / torch.zeros_like(grad)


class BadBackward(nn.Module):
    def forward(self, x):
        return DivideByZeroGrad.apply(x)


class Inner(nn.Module):
    """A container whose own forward (not its child) makes the NaN."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)

    def forward(self, x):
        return torch.log(self.lin(x))


def test_nonfinite_forward_names_the_producer_and_saves_a_reproducing_batch(tmp_path):
    model = nn.Sequential(nn.Linear(D, 32), Log(), nn.ReLU(), nn.Linear(32, C))
    findings = diagnose(model, make_batches(), save_dir=tmp_path)
    (f,) = found(findings, "nonfinite_forward")
    assert (f.module, f.severity) == ("1", "error")  # not the ReLU or Linear that only pass it on
    assert not found(findings, "nonfinite_loss")
    saved = torch.load(tmp_path / NONFINITE_BATCH_FILE)
    assert saved["module"] == "1" and str(tmp_path) in f.message
    replay = nn.Sequential(nn.Linear(D, 32), Log(), nn.ReLU(), nn.Linear(32, C))
    replay.load_state_dict(saved["model_state"])
    torch.set_rng_state(saved["rng_state"])
    assert not torch.isfinite(replay(saved["x"])).all()


def test_nonfinite_forward_inside_a_container_names_the_container():
    model = nn.Sequential(nn.Linear(D, 32), Inner(), nn.Linear(32, C))
    (f,) = found(diagnose(model, make_batches()), "nonfinite_forward")
    assert f.module == "1"


def test_nan_in_the_data_is_blamed_on_the_data():
    batches = make_batches()
    batches[0][0][3, 2] = float("nan")
    (f,) = found(diagnose(healthy_mlp(), batches), "nonfinite_forward")
    assert f.module == "" and "input batch" in f.message


@pytest.mark.parametrize("bad", [SqrtRelu, BadBackward])
def test_nonfinite_backward_names_the_module(bad, tmp_path):
    model = nn.Sequential(nn.Linear(D, 32), nn.Linear(32, 32), bad(), nn.Linear(32, C))
    findings = diagnose(model, make_batches(), save_dir=tmp_path)
    (f,) = found(findings, "nonfinite_backward")
    assert (f.module, f.severity) == ("2", "error")
    assert not found(findings, "nonfinite_forward") and not found(findings, "nonfinite_loss")
    saved = torch.load(tmp_path / NONFINITE_BATCH_FILE)
    model.load_state_dict(saved["model_state"])
    x = saved["x"].clone().requires_grad_(True)
    F.cross_entropy(model(x), saved["y"]).backward()
    assert not torch.isfinite(model[0].weight.grad).all()


def test_nonfinite_backward_with_inplace_ops_falls_back_to_parameter_gradients():
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(inplace=True), BadBackward(), nn.Linear(32, C))
    (f,) = found(diagnose(model, make_batches()), "nonfinite_backward")
    assert f.module in ("0", "2")


def test_nonfinite_loss_when_no_module_is_to_blame(tmp_path):
    def log_zero_loss(pred, y):
        p = pred.softmax(1).gather(1, y[:, None])
        return -torch.log(p * 0).mean()  # log(0)

    findings = diagnose(healthy_mlp(), make_batches(), log_zero_loss, save_dir=tmp_path)
    # the one root cause; the NaN losses it made are listed under it
    assert [(f.kind, f.module) for f in findings if f.severity == "error" and not f.caused_by] == [("nonfinite_loss", "")]
    assert "hand-written loss" in found(findings, "nonfinite_loss")[0].fix
    saved = torch.load(tmp_path / NONFINITE_BATCH_FILE)
    model = healthy_mlp()
    model.load_state_dict(saved["model_state"])
    assert not torch.isfinite(log_zero_loss(model(saved["x"]), saved["y"]))


# --- activations ---------------------------------------------------------------------------------------------
def test_dead_units():
    model = plain_mlp()
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second ReLU's inputs are all very negative
    (f,) = found(diagnose(model, make_batches()), "dead_units")
    assert f.module == "3" and f.evidence["dead_fraction"] == 1.0


def test_activation_explosion_names_the_first_layer():
    model = plain_mlp(h=256, depth=4)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)  # sqrt(fan_in) too large: std x4, x11, x11, ... per layer
    (f,) = found(diagnose(model, make_batches(), steps=2), "activation_explosion")
    assert f.module == "4" and f.evidence["ratio"] > 100  # layer '2' is at ~45x, '4' past 100x


def test_activation_collapse_names_the_first_layer():
    model = plain_mlp(h=64, depth=4)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    (f,) = found(diagnose(model, make_batches(), steps=2), "activation_collapse")
    assert f.module == "2"


def test_healthy_mlp_without_norm_is_not_flagged_for_scale():
    findings = diagnose(plain_mlp(depth=3), make_batches())
    assert not found(findings, "activation_explosion") and not found(findings, "activation_collapse")


def test_saturation():
    model = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, C))
    with torch.no_grad():
        model[0].weight.mul_(30)
    assert [f.module for f in found(diagnose(model, make_batches()), "saturation")] == ["1"]
    assert not found(diagnose(nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, C)), make_batches()), "saturation")


# --- the loss head and the targets ---------------------------------------------------------------------------
def test_softmax_before_cross_entropy():
    f = found(diagnose(nn.Sequential(healthy_mlp(), nn.Softmax(1)), make_batches()), "softmax_before_cross_entropy")
    assert [x.severity for x in f] == ["error"]
    f = found(diagnose(nn.Sequential(healthy_mlp(), nn.LogSoftmax(1)), make_batches(), nn.CrossEntropyLoss()),
              "softmax_before_cross_entropy")
    assert [x.severity for x in f] == ["info"]


def test_probabilities_to_nll():
    for head, loss in [(nn.Softmax(1), F.nll_loss), (nn.Identity(), nn.NLLLoss())]:
        (f,) = found(diagnose(nn.Sequential(healthy_mlp(), head), make_batches(), loss), "probabilities_to_nll")
        assert f.severity == "error" and "log-probabilities" in f.fix
    assert problems(diagnose(nn.Sequential(healthy_mlp(), nn.LogSoftmax(1)), make_batches(), F.nll_loss)) == []


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_target_mismatch_is_found_and_diagnose_does_not_raise():
    float_targets = [(x, y.float()) for x, y in make_batches()]
    out_of_range = [(x, y * 3) for x, y in make_batches()]  # labels up to 9 for 4 outputs
    column = [(x, y[:, None]) for x, y in make_batches()]
    for batches in (float_targets, out_of_range, column):
        findings = diagnose(healthy_mlp(), batches)
        assert found(findings, "target_mismatch"), findings
    mse = diagnose(nn.Linear(D, 1), [(x, y.float()) for x, y in make_batches()], F.mse_loss)
    assert [f.severity for f in found(mse, "target_mismatch")] == ["error"]
    assert problems(diagnose(healthy_mlp(), [(x, F.one_hot(y, C).float()) for x, y in make_batches()])) == []


# --- exceptions ----------------------------------------------------------------------------------------------
def test_exceptions_become_findings():
    (f,) = diagnose(nn.Linear(D + 1, C), make_batches())
    assert (f.kind, f.severity) == ("exception", "error") and "RuntimeError" in f.message and f.evidence["where"] == "forward"

    def broken_data():
        yield make_batches()[0]
        raise OSError("disk gone")

    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(D, C), 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 3:
                raise ValueError("step 3 broke")
            return self.lin(x)

    (f,) = found(diagnose(Flaky(), make_batches()), "exception")
    assert "step 3 broke" in f.message
    (f,) = found(diagnose(healthy_mlp(), broken_data(), steps=5), "exception")
    assert f.kind == "exception"
    (f,) = diagnose(healthy_mlp(), [])
    assert f.kind == "exception" and f.evidence["where"] == "data"
    (f,) = found(diagnose(nn.Flatten(), make_batches()), "exception")  # no parameters to train
    assert f.evidence["where"] == "model" and "no parameter with requires_grad=True" in f.message
    frozen = healthy_mlp().requires_grad_(False)
    (f,) = found(diagnose(frozen, make_batches()), "exception")
    assert "no parameter with requires_grad=True" in f.message and "requires_grad_(True)" in f.fix


# --- init, gradients, learning rate --------------------------------------------------------------------------
def test_symmetric_init_two_zero_layers_is_fatal_one_is_not():
    model = plain_mlp(depth=1)
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[2].weight)
    both = found(diagnose(model, make_batches()), "symmetric_init")
    assert [(f.module, f.severity) for f in both] == [("0", "error"), ("2", "error")]
    model = plain_mlp(depth=2)
    nn.init.constant_(model[2].weight, 0.05)
    (one,) = found(diagnose(model, make_batches()), "symmetric_init")
    assert (one.module, one.severity) == ("2", "warning")
    last = plain_mlp(depth=1)
    nn.init.zeros_(last[2].weight)
    assert [f.severity for f in found(diagnose(last, make_batches()), "symmetric_init")] == ["info"]


def test_no_gradient_for_unused_and_detached_modules():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.side, self.unused = nn.Linear(D, C), nn.Linear(D, C), nn.Linear(D, C)

        def forward(self, x):
            return self.body(x) + self.side(x).detach()

    found_modules = sorted(f.module for f in found(diagnose(Model(), make_batches()), "no_gradient"))
    assert found_modules == ["side", "unused"]
    frozen = healthy_mlp()
    frozen[0].requires_grad_(False)  # frozen on purpose: not a finding
    assert not found(diagnose(frozen, make_batches()), "no_gradient")


def test_learning_rate_too_high_and_too_low():
    assert [f.severity for f in found(diagnose(healthy_mlp(), make_batches(), lr=10.0), "lr_too_high")] == ["error"]
    low = diagnose(plain_mlp(), make_batches(), lr=1e-6, opt_func=torch.optim.SGD)
    assert [f.kind for f in problems(low)] == ["lr_too_low"]
    assert not found(diagnose(plain_mlp(), make_batches(), lr=0.1, opt_func=torch.optim.SGD), "lr_too_low")


# --- batch norm and inputs -----------------------------------------------------------------------------------
def test_batchnorm_small_batch():
    small = diagnose(healthy_mlp(), make_batches(bs=4))
    assert [(f.kind, f.severity) for f in problems(small)] == [("batchnorm_small_batch", "warning")]
    one = diagnose(healthy_mlp(), make_batches(n=16, bs=1), steps=3)
    assert [f.severity for f in found(one, "batchnorm_small_batch")] == ["error"]
    assert found(one, "exception")  # BatchNorm1d refuses one sample: quoted, not raised
    x, y = torch.randn(N + 1, D), torch.randint(0, C, (N + 1,))
    (f,) = found(diagnose(healthy_mlp(), TensorBatches(x, y, BS), steps=3), "batchnorm_small_batch")
    assert f.severity == "error" and "last batch" in f.message
    assert not found(diagnose(plain_mlp(), make_batches(bs=4)), "batchnorm_small_batch")


def test_input_not_normalized():
    (f,) = found(diagnose(healthy_mlp(), make_batches(scale=80.0, shift=100.0), steps=5), "input_not_normalized")
    assert f.severity == "warning" and f.evidence["mean"] > 50


def test_sequence_outputs_are_judged_per_feature_not_per_position():
    """(N, L, C) embeddings: 'dead' is about the C features; 10 positions are not 10 units."""
    from deepscope.dead import unit_axis

    torch.manual_seed(0)
    L, C, V = 10, 16, 30
    emb = nn.Embedding(V, C)
    with torch.no_grad():
        emb.weight[:, :10] = -1.0  # features 0-9 are negative for every token: dead after the ReLU

    class SeqModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.act, self.head = emb, nn.ReLU(), nn.Linear(C, 4)

        def forward(self, x):
            return self.head(self.act(self.emb(x)).mean(1))

    x = torch.randint(0, V, (64, L))
    batches = [(x[i:i + 16], x[i:i + 16, 0] % 4) for i in range(0, 64, 16)]
    findings = diagnose(SeqModel(), batches, steps=4, lr=1e-4)
    dead = {f.module: f for f in findings if f.kind == "dead_units"}
    assert "emb" not in dead, "the embedding's positions were mistaken for units"
    assert dead["act"].evidence["units"] == C and dead["act"].evidence["dead_fraction"] == pytest.approx(10 / C)
    # the axis rule itself
    assert unit_axis(nn.Embedding(3, 4), torch.zeros(2, 5, 4)) == -1
    assert unit_axis(nn.Conv1d(3, 4, 1), torch.zeros(2, 4, 5)) == 1
    assert unit_axis(nn.ReLU(), torch.zeros(2, 5, 4), previous=-1) == -1
    assert unit_axis(nn.ReLU(), torch.zeros(2, 4, 8, 8)) == 1
    assert unit_axis(nn.LayerNorm([4, 8, 8]), torch.zeros(2, 4, 8, 8), previous=1) == 1


@pytest.mark.parametrize("dtype, flagged", [(torch.uint8, False), (torch.int64, False), (torch.int32, True)])
def test_class_labels_of_a_dtype_torch_takes_are_not_flagged(dtype, flagged):
    """cross_entropy takes Long or Byte class indices: only what torch refuses is a finding."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).to(dtype)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    findings = diagnose(model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], steps=4)
    kinds = {f.kind for f in findings if f.severity == "error"}
    assert (("target_mismatch" in kinds) or ("exception" in kinds)) == flagged, findings
