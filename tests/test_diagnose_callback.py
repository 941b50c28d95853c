"""The Diagnose callback: same findings during a real fit, hooks only on checked steps, none left after."""
import pytest
import torch
from torch import nn

from deepscope import Callback, CancelFitException, Learner
from deepscope.data import DataLoaders
from deepscope.diagnose import Diagnose, problems
from test_diagnose_fixtures import healthy_mlp, make_batches


pytestmark = pytest.mark.usefixtures("one_thread")


def dls():
    return DataLoaders(make_batches(), make_batches(n=64, seed=1), n_classes=4)


def no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


class CountHooks(Callback):
    """Counts forward hooks on the model at after_pred of every training step."""
    order = 40

    def __init__(self):
        self.counts = []

    def after_pred(self, learn):
        if learn.training:
            self.counts.append(sum(len(m._forward_hooks) for m in learn.model.modules()))


def test_healthy_fit_has_no_problems_and_hooks_only_on_checked_steps():
    diag, count = Diagnose(every=4), CountHooks()
    learn = Learner(healthy_mlp(), dls(), lr=1e-2, cbs=[diag, count])
    learn.fit(3)
    assert problems(diag.findings) == []
    assert [c > 0 for c in count.counts[:8]] == [True, False, False, False] * 2
    assert no_hooks(learn.model)
    assert len(diag.record.losses) == 6  # 24 steps, one in 4 checked


def test_findings_accumulate_during_the_fit():
    diag = Diagnose(every=2)
    learn = Learner(nn.Sequential(healthy_mlp(), nn.Softmax(1)), dls(), cbs=[diag])
    learn.fit(2)
    assert [f.kind for f in problems(diag.findings)] == ["softmax_before_cross_entropy"]
    learn.fit(1)  # a second fit does not duplicate what is known
    assert [f.kind for f in problems(diag.findings)] == ["softmax_before_cross_entropy"]


def test_nan_during_fit_is_found_without_stopping_it(tmp_path):
    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)

    diag = Diagnose(every=1, save_dir=tmp_path)
    learn = Learner(nn.Sequential(nn.Linear(16, 8), Log(), nn.Linear(8, 4)), dls(), cbs=[diag])
    learn.fit(1)
    assert learn.train_iter == 8  # the fit ran to the end
    (f,) = [f for f in diag.findings if f.kind == "nonfinite_forward"]
    assert f.module == "1" and "(Log)" in f.message and (tmp_path / "nonfinite_batch.pt").is_file()
    assert [f.kind for f in diag.findings if f.severity == "error"] == ["nonfinite_forward"]  # the NaN's followers are not findings


def test_cancelled_fit_leaves_no_hooks():
    class Stop(Callback):
        order = 40

        def after_pred(self, learn):
            raise CancelFitException()

    learn = Learner(healthy_mlp(), dls(), cbs=[Diagnose(every=1), Stop()])
    learn.fit(1)
    assert no_hooks(learn.model)
