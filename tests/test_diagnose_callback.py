"""The Diagnose callback: same findings during a real fit, hooks only on checked steps, none left after."""
import pytest
import torch
from torch import nn

from deepscope import Callback, CancelFitException, Learner
from deepscope.data import DataLoaders
from deepscope.diagnose import Diagnose, problems
from deepscope.stats import ActivationStats
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


def test_healthy_fit_has_no_problems_and_says_what_it_checked():
    diag = Diagnose()
    learn = Learner(healthy_mlp(), dls(), lr=1e-2, cbs=[diag])
    learn.fit(3)
    assert problems(diag.findings) == []
    assert no_hooks(learn.model)
    record = diag.record(learn)
    assert len(record.losses) == 24 and len(record.stats.steps) == 24  # every step, not one in fifty
    assert diag.analysis.steps == 24 and len(diag.analysis.ran) >= 10
    assert diag.analysis.summary().startswith(f"{len(diag.analysis.ran)} checks on 24 steps: no problems found.")
    assert any("needs 100 steps" in why for _, why in diag.analysis.skipped)  # 24 steps are too few for not_learning


def test_uses_the_learners_statistics_instead_of_recording_twice():
    stats, diag, count = ActivationStats(), Diagnose(), CountHooks()
    learn = Learner(healthy_mlp(), dls(), lr=1e-2, cbs=[stats, diag, count])
    learn.fit(1)
    alone, count_alone = ActivationStats(), CountHooks()
    Learner(healthy_mlp(), dls(), lr=1e-2, cbs=[alone, count_alone]).fit(1)
    assert count.counts == count_alone.counts  # Diagnose added no hooks of its own
    assert diag.record(learn).stats.steps.tolist() == stats.stats().steps.tolist()


def test_findings_are_recomputed_not_duplicated():
    diag = Diagnose()
    learn = Learner(nn.Sequential(healthy_mlp(), nn.Softmax(1)), dls(), cbs=[diag])
    learn.fit(2)
    assert [f.kind for f in problems(diag.findings)] == ["softmax_before_cross_entropy"]
    learn.fit(1)  # a second fit does not duplicate what is known
    assert [f.kind for f in problems(diag.findings)] == ["softmax_before_cross_entropy"]


def test_nan_during_fit_is_found_without_stopping_it(tmp_path):
    class Log(nn.Module):
        def forward(self, x):
            return torch.log(x)

    diag = Diagnose(save_dir=tmp_path)
    learn = Learner(nn.Sequential(nn.Linear(16, 8), Log(), nn.Linear(8, 4)), dls(), cbs=[diag])
    learn.fit(1)
    assert learn.train_iter == 8  # the fit ran to the end
    (f,) = [f for f in diag.findings if f.kind == "nonfinite_forward"]
    assert f.module == "1" and "(Log)" in f.message and (tmp_path / "nonfinite_batch.pt").is_file()
    # the NaN's followers are listed under it, not as causes of their own
    assert [f.kind for f in diag.findings if f.severity == "error" and not f.caused_by] == ["nonfinite_forward"]


class NanFrom(nn.Module):
    """Passes its input through until its `start`-th training call, then puts one NaN in its output."""

    def __init__(self, start):
        super().__init__()
        self.start, self.calls = start, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls > self.start:
                x = x.clone()
                x[0, 0] = float("nan")
        return x


def test_a_nan_made_late_is_blamed_on_its_producer_at_its_step():
    """The NaN appears at step 60 in 'spike'; by step 100 every later layer's weights are NaN too. Every
    step is checked, so the producer is named, at the step it made the NaN."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), NanFrom(60), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    diag = Diagnose()
    learn = Learner(model, DataLoaders(make_batches(n=1024), None, n_classes=4), lr=1e-3, cbs=[diag])
    learn.fit(7, valid=False)
    (f,) = [f for f in diag.findings if f.kind == "nonfinite_forward"]
    assert (f.module, f.evidence["step"], f.evidence["source"]) == ("2", 60, "replay")
    roots = [g.kind for g in problems(diag.findings) if not g.caused_by]
    assert roots == ["nonfinite_forward"], diag.findings


def test_cancelled_fit_leaves_no_hooks():
    class Stop(Callback):
        order = 40

        def after_pred(self, learn):
            raise CancelFitException()

    learn = Learner(healthy_mlp(), dls(), cbs=[Diagnose(), Stop()])
    learn.fit(1)
    assert no_hooks(learn.model)


def test_without_statistics_it_judges_the_losses_and_says_what_it_left_out():
    """`deepscope train --no-stats`: Diagnose records no statistics of its own, and says so."""
    diag, count = Diagnose(record_stats=False), CountHooks()
    learn = Learner(healthy_mlp(), dls(), lr=1e-2, cbs=[diag, count])
    learn.fit(1)
    assert set(count.counts) == {0}  # no hook on any step
    assert diag.record(learn).stats is None and len(diag.record(learn).losses) == 8
    assert ("dead units (per-unit census of ReLU-like activations)", "no statistics were recorded") in \
        diag.analysis.skipped
