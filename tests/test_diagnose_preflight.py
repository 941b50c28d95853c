"""Pre-flight: which layers count as BatchNorm (batch statistics in training) is decided by type, not name."""
import pytest
import torch
from torch import nn

from deepscope.diagnose.preflight import inspect_setup, is_batchnorm
from deepscope.norms import BatchNorm, RunningBatchNorm


class MyBatchNorm(nn.BatchNorm1d):  # a user's subclass of torch's BatchNorm is one
    pass


class BatchNormLogger(nn.Module):  # named like one, but normalises nothing
    def forward(self, x):
        return x


@pytest.mark.parametrize("module, expected", [
    (nn.BatchNorm1d(4), True), (nn.BatchNorm2d(4), True), (nn.SyncBatchNorm(4), True), (nn.LazyBatchNorm1d(), True),
    (BatchNorm(4), True), (MyBatchNorm(4), True),
    (RunningBatchNorm(4), False),  # built for tiny batches: its statistics pool many of them
    (BatchNormLogger(), False), (nn.InstanceNorm1d(4), False), (nn.LayerNorm(4), False),
])
def test_is_batchnorm_by_type(module, expected):
    assert is_batchnorm(module) is expected


def test_running_batchnorm_at_batch_size_two_is_not_reported_as_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), RunningBatchNorm(4), nn.ReLU(), nn.Linear(4, 2), BatchNorm(2))
    rec = inspect_setup(model, torch.randn(2, 3), torch.tensor([0, 1]), nn.CrossEntropyLoss())
    assert rec.batchnorms == ["4"] and rec.error is None


# --- loss_shape_mismatch: outputs and targets that broadcast to a bigger shape inside the loss ------------------
class LSTMRegressor(nn.Module):
    def __init__(self, outputs: int = 1):
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 8, batch_first=True), nn.Linear(8, outputs)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


NETS = {  # (model with `outputs` outputs, a batch of 16 inputs)
    "mlp": (lambda k: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, k)), lambda: torch.randn(16, 6)),
    "cnn": (lambda k: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(4, k)), lambda: torch.randn(16, 1, 6, 6)),
    "lstm": (LSTMRegressor, lambda: torch.randn(16, 5, 3)),
}


def setup_findings(arch: str, outputs: int, y, loss_func) -> dict:
    from deepscope.diagnose.setup_checks import analyse_setup

    make, inputs = NETS[arch]
    return {f.kind: f for f in analyse_setup(inspect_setup(make(outputs), inputs(), y, loss_func))}


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("arch", list(NETS))
@pytest.mark.parametrize("loss_func", [nn.MSELoss(), nn.functional.l1_loss, nn.SmoothL1Loss(),
                                       lambda pred, y: ((pred - y) ** 2).mean()])  # a custom loss: its value tells
def test_predictions_of_shape_n_1_against_targets_of_shape_n(arch, loss_func):
    f = setup_findings(arch, 1, torch.randn(16), loss_func)["loss_shape_mismatch"]
    assert f.severity == "error" and f.evidence["broadcast_shape"] == [16, 16]
    assert f.evidence["output_shape"] == [16, 1] and f.evidence["target_shape"] == [16]
    assert "(16, 16)" in f.message and "view_as" in f.fix


@pytest.mark.parametrize("arch", list(NETS))
def test_matching_shapes_and_class_indices_are_no_loss_shape_mismatch(arch):
    assert "loss_shape_mismatch" not in setup_findings(arch, 1, torch.randn(16, 1), nn.functional.mse_loss)
    assert "loss_shape_mismatch" not in setup_findings(arch, 4, torch.randint(0, 4, (16,)), nn.CrossEntropyLoss())
    squeezed = lambda pred, y: nn.functional.mse_loss(pred.squeeze(-1), y)  # noqa: E731 - reshaped in the loss
    assert "loss_shape_mismatch" not in setup_findings(arch, 1, torch.randn(16), squeezed)


def test_loss_shape_check_on_plain_records():
    from deepscope.diagnose.records import SetupRecord
    from deepscope.diagnose.setup_checks import check_loss_shapes

    rec = lambda **kw: SetupRecord(**{"out_shape": (8, 1), "y_shape": (8,), "y_dtype": "float32", **kw})  # noqa: E731
    assert [f.severity for f in check_loss_shapes(rec(loss_kind="mse"))] == ["error"]
    assert check_loss_shapes(rec(loss_kind="mse", y_shape=(8, 1))) == []
    assert check_loss_shapes(rec(loss_kind="mse", out_shape=(8, 3), y_shape=(8, 1))) == [], "no bigger than the output"
    assert check_loss_shapes(rec(loss_kind="bce_logits", error={"where": "loss", "type": "ValueError",
                                                                "message": "Target size"})) == [], "torch raised"
    # the loss unknown (a custom loss, or watch): float targets only, and how its value paired them decides
    assert [f.severity for f in check_loss_shapes(rec(loss_pairs="broadcast"))] == ["error"]
    assert [f.severity for f in check_loss_shapes(rec())] == ["warning"]
    assert check_loss_shapes(rec(loss_pairs="paired")) == []
    assert check_loss_shapes(rec(y_dtype="int64")) == [], "integer targets with an unknown loss: class indices"
    assert check_loss_shapes(rec(loss_kind="cross_entropy", out_shape=(8, 1))) == []


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_diagnose_reports_the_broadcast_loss():
    from deepscope import diagnose

    batches = [(torch.randn(16, 6), torch.randn(16)) for _ in range(3)]
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    assert "loss_shape_mismatch" in {f.kind for f in diagnose(model, batches, nn.functional.mse_loss, steps=2)}
    column = [(x, y[:, None]) for x, y in batches]
    assert "loss_shape_mismatch" not in {f.kind for f in diagnose(model, column, nn.functional.mse_loss, steps=2)}
