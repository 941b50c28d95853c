"""`DeepscopeCallback` in a Lightning fit: the same numbers as `deepscope.watch` on a plain loop with the
same model, data and optimiser; one recorded step per optimiser step; hooks gone however the fit ends;
float16 gradients unscaled and skipped steps not measured; findings and a report. Skipped without
Lightning (pip install deepscope[lightning])."""
import copy
import sys

import numpy as np
import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import deepscope  # noqa: E402
from deepscope.errors import ConfigError  # noqa: E402
from deepscope.integrations.lightning import DeepscopeCallback  # noqa: E402

# Lightning's own warnings: a tiny DataLoader without workers; its use of a torch API deprecated in 2.13
pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)")]
FIELDS = ("act_mean", "act_std", "act_dead", "act_hist", "grad_norm", "grad_std", "weight_norm",
          "param_grad_norm", "update_ratio")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def loader(n: int = 6, bs: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n * bs, 10, generator=g), torch.randint(0, 3, (n * bs,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=bs)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.1, fail_at: int | None = None):
        super().__init__()
        self.net, self.lr, self.fail_at = net, lr, fail_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        xb, yb = batch
        return F.cross_entropy(self.net(xb), yb)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module: pl.LightningModule, data: DataLoader, cb, **options) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[cb], **options)
    trainer.fit(module, data)
    return trainer


def watched_loop(net: nn.Module, data: DataLoader, accumulate: int = 1, subsample: int | None = 4096):
    """A plain loop under `deepscope.watch`, doing what Lightning does: each loss divided by `accumulate`."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    batches = list(data)
    with deepscope.watch(net, opt, subsample=subsample) as w:
        for k in range(0, len(batches), accumulate):
            opt.zero_grad()
            window = batches[k:k + accumulate]
            losses = [F.cross_entropy(net(xb), yb) for xb, yb in window]
            for loss in losses:
                (loss / accumulate).backward()
            opt.step()
            w.step(torch.stack(losses).mean())
    return w


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def assert_same_statistics(cb, w, steps: int):
    a, b = cb.stats(), w.stats()
    assert a.modules == [f"net.{m}" for m in b.modules] and a.param_modules == [f"net.{m}" for m in b.param_modules]
    assert a.steps.tolist() == b.steps.tolist() == list(range(steps))
    for field in FIELDS:
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, err_msg=field)
    np.testing.assert_allclose(cb.losses, w.losses, rtol=1e-6)


@pytest.mark.parametrize("subsample", [None, 64])
def test_statistics_equal_watch_on_a_plain_loop(subsample, one_thread):
    net, data = mlp(), loader()
    module, cb = Classifier(copy.deepcopy(net)), DeepscopeCallback(subsample=subsample)
    fit(module, data, cb)
    w = watched_loop(net, data, subsample=subsample)
    assert_same_statistics(cb, w, steps=6)
    assert no_hooks(module)


def test_accumulated_batches_are_one_step(one_thread):
    net, data = mlp(), loader(n=6)
    module, cb = Classifier(copy.deepcopy(net)), DeepscopeCallback(subsample=None)
    trainer = fit(module, data, cb, accumulate_grad_batches=2)
    assert trainer.global_step == 3
    w = watched_loop(net, data, accumulate=2, subsample=None)
    assert_same_statistics(cb, w, steps=3)  # losses: the mean of each step's two batches


def test_hooks_go_when_training_step_raises(one_thread):
    module, cb = Classifier(mlp(), fail_at=3), DeepscopeCallback()
    with pytest.raises(RuntimeError, match="boom"):
        fit(module, loader(), cb)
    assert no_hooks(module)
    s = cb.stats()
    assert s.steps.tolist() == [0, 1, 2] and np.isfinite(s.act_std).all()  # the failed step is dropped
    assert len(cb.losses) == 3


def _float16(init_scale: float):
    from lightning.pytorch.plugins import MixedPrecision

    # precision="16-mixed" on a CPU becomes bf16 in Lightning; a plugin given explicitly keeps float16
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def test_float16_gradients_are_unscaled_and_skipped_steps_not_measured(one_thread):
    net, data = mlp(), loader(n=3)
    plain, half = DeepscopeCallback(subsample=None), DeepscopeCallback(subsample=None)
    fit(Classifier(copy.deepcopy(net)), data, plain)
    fit(Classifier(copy.deepcopy(net)), data, half, plugins=[_float16(2.0 ** 16)])
    # the hooks saw output gradients 65536x too large; the engine divided them back (float16 rounding aside)
    np.testing.assert_allclose(half.stats().grad_norm, plain.stats().grad_norm, rtol=0.02)
    np.testing.assert_allclose(half.stats().param_grad_norm, plain.stats().param_grad_norm, rtol=0.02)

    skipped = DeepscopeCallback()
    fit(Classifier(copy.deepcopy(net)), data, skipped, plugins=[_float16(2.0 ** 80)])  # every step overflows
    s = skipped.stats()
    assert s.steps.tolist() == [0, 1, 2] and np.isfinite(s.act_mean).all()
    assert np.isnan(s.update_ratio).all() and np.isnan(s.param_grad_norm).all() and np.isnan(s.grad_norm).all()


def test_findings_and_a_report(tmp_path, one_thread):
    cb = DeepscopeCallback(n_classes=3)
    fit(Classifier(mlp(), lr=1e6), loader(n=12), cb)  # diverges
    assert "diverged" in {f.kind for f in cb.findings()}
    path = cb.report(tmp_path)
    html = path.read_text()
    assert path == tmp_path / "report.html" and "data:image/png;base64" in html and "diverged" in html
    assert cb.save(tmp_path).name == "stats.npz"


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="every"):
        DeepscopeCallback(every=0)
    with pytest.raises(ConfigError, match="unknown option"):
        DeepscopeCallback(subsampel=64)
    with pytest.raises(RuntimeError, match="recorded nothing"):
        DeepscopeCallback().stats()


def test_without_lightning_the_error_names_the_extra(monkeypatch):
    import deepscope.integrations.lightning as module

    # as if Lightning were not installed: the class is made again at the next look-up, and cannot be.
    # (That importing the module imports no Lightning is test_import_side_effects' check.)
    monkeypatch.setitem(sys.modules, "lightning.pytorch.callbacks", None)
    monkeypatch.delattr(module, "DeepscopeCallback")
    with pytest.raises(ConfigError, match=r"pip install deepscope\[lightning\]"):
        module.DeepscopeCallback
