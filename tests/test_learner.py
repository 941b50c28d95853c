import pytest
import torch
from torch import nn

from deepscope.callback import (
    EVENTS, Callback, CallbackError, CancelBatchException, CancelEpochException, CancelFitException,
    CancelTrainException, CancelValidateException,
)
from deepscope.data import DataLoaders
from deepscope.errors import ConfigError
from deepscope.learner import Learner, TrainStep


def batches(n, bs=4, n_in=3, n_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, n_in, generator=g), torch.randint(0, n_out, (bs,), generator=g)) for _ in range(n)]


def make_learner(n_train=3, n_valid=2, cbs=(), **kw):
    model = nn.Linear(3, 2)
    dls = DataLoaders(train=batches(n_train), valid=batches(n_valid, seed=1) if n_valid else None)
    return Learner(model, dls, nn.functional.cross_entropy, lr=0.1, opt_func=torch.optim.SGD, cbs=cbs, **kw)


class Log(Callback):
    """Records every event it sees, in order."""

    def __init__(self):
        self.events = []


for _event in EVENTS:
    setattr(Log, _event, lambda self, learn, _e=_event: self.events.append(_e))


BATCH_TRAIN = ["before_batch", "after_pred", "after_loss", "after_backward", "after_step", "after_batch", "cleanup_batch"]
BATCH_VALID = ["before_batch", "after_pred", "after_loss", "after_batch", "cleanup_batch"]


def test_event_order_of_one_epoch():
    log = Log()
    make_learner(n_train=2, n_valid=1, cbs=[log]).fit(1)
    expected = (["before_fit", "before_epoch", "before_train"] + BATCH_TRAIN * 2 + ["after_train", "cleanup_train",
                "before_validate"] + BATCH_VALID + ["after_validate", "cleanup_validate", "after_epoch",
                "cleanup_epoch", "after_fit", "cleanup_fit"])
    assert log.events == expected


def test_epochs_and_iteration_state():
    seen = []

    class Watch(Callback):
        def after_batch(self, learn):
            seen.append((learn.epoch, learn.training, learn.iter, learn.train_iter, learn.n_iter))

    make_learner(n_train=2, n_valid=1, cbs=[Watch()]).fit(2)
    assert seen == [(0, True, 0, 0, 2), (0, True, 1, 1, 2), (0, False, 0, 2, 1),
                    (1, True, 0, 2, 2), (1, True, 1, 3, 2), (1, False, 0, 4, 1)]


def test_training_changes_the_weights_and_validation_does_not():
    learn = make_learner(n_train=3, n_valid=0)
    before = learn.model.weight.detach().clone()
    learn.fit(1)
    assert not torch.equal(before, learn.model.weight)
    after = learn.model.weight.detach().clone()
    learn.dls.valid = batches(2)
    learn.validate()
    assert torch.equal(after, learn.model.weight)


def raise_at(event, exc, when=lambda learn: True):
    class Raiser(Callback):
        order = 1  # after Log, so Log records the event that raised

    def handler(self, learn):
        if when(learn):
            raise exc()

    setattr(Raiser, event, handler)
    return Raiser()


def test_cancel_batch_skips_backward_and_step_but_runs_cleanup():
    log = Log()
    learn = make_learner(n_train=1, n_valid=0, cbs=[log, raise_at("after_loss", CancelBatchException)])
    before = learn.model.weight.detach().clone()
    learn.fit(1)
    batch_events = log.events[log.events.index("before_batch"):log.events.index("after_train")]
    assert batch_events == ["before_batch", "after_pred", "after_loss", "cleanup_batch"]
    assert torch.equal(before, learn.model.weight)


def test_cancel_train_skips_to_validation():
    log = Log()
    make_learner(n_train=3, n_valid=1, cbs=[log, raise_at("before_batch", CancelTrainException, lambda l: l.training and l.iter == 1)]).fit(1)
    assert log.events.count("after_step") == 1
    assert "after_train" not in log.events and "cleanup_train" in log.events
    assert "after_validate" in log.events and "after_epoch" in log.events


def test_cancel_validate_keeps_the_epoch():
    log = Log()
    make_learner(n_train=1, n_valid=2, cbs=[log, raise_at("before_validate", CancelValidateException)]).fit(1)
    assert "after_validate" not in log.events and "cleanup_validate" in log.events and "after_epoch" in log.events


def test_cancel_epoch_moves_to_next_epoch():
    log = Log()
    learn = make_learner(n_train=2, n_valid=1, cbs=[log, raise_at("after_batch", CancelEpochException, lambda l: l.epoch == 0)])
    learn.fit(2)
    assert log.events.count("before_epoch") == 2 and log.events.count("cleanup_epoch") == 2
    assert log.events.count("after_epoch") == 1  # only the second epoch finished normally
    assert log.events.count("before_validate") == 1


def test_cancel_fit_runs_cleanup_fit_only():
    log = Log()
    make_learner(cbs=[log, raise_at("after_step", CancelFitException)]).fit(3)
    assert log.events.count("after_step") == 1
    assert "after_fit" not in log.events
    assert log.events[-5:] == ["after_step", "cleanup_batch", "cleanup_train", "cleanup_epoch", "cleanup_fit"]
    assert "after_epoch" not in log.events and "before_validate" not in log.events


def test_real_errors_propagate_with_the_callback_name_and_event_and_cleanup_runs():
    log = Log()

    class Broken(Callback):
        def after_loss(self, learn):
            raise ZeroDivisionError("boom")

    with pytest.raises(CallbackError, match=r"callback Broken failed in after_loss: ZeroDivisionError: boom") as info:
        make_learner(cbs=[log, Broken()]).fit(1)
    assert isinstance(info.value.__cause__, ZeroDivisionError) and info.value.event == "after_loss"
    assert log.events[-4:] == ["cleanup_batch", "cleanup_train", "cleanup_epoch", "cleanup_fit"]


def test_callbacks_run_in_order_of_their_order_attribute():
    calls = []

    def cb(name, order):
        return type(name, (Callback,), {"order": order, "before_fit": lambda self, learn: calls.append(name)})()

    make_learner(cbs=[cb("late", 10), cb("early", -5), cb("middle", 0)]).fit(1)
    assert calls == ["early", "middle", "late"]


def test_fit_callbacks_are_temporary_and_construction_callbacks_stay():
    permanent, temporary = Log(), Log()
    learn = make_learner(cbs=[permanent])
    learn.fit(1, cbs=[temporary])
    assert temporary not in learn.cbs and permanent in learn.cbs
    learn.fit(1)
    assert permanent.events.count("before_fit") == 2 and temporary.events.count("before_fit") == 1


def test_fit_callbacks_removed_even_when_fit_raises():
    temporary = raise_at("before_fit", RuntimeError)
    learn = make_learner()
    with pytest.raises(CallbackError):
        learn.fit(1, cbs=[temporary])
    assert temporary not in learn.cbs


def test_misspelled_event_is_an_error():
    class Typo(Callback):
        def after_bacth(self, learn):
            pass

    with pytest.raises(ValueError, match="after_bacth.*did you mean 'after_batch'"):
        make_learner(cbs=[Typo()])


def test_callback_can_change_state_lr_and_batch():
    class Tweak(Callback):
        def before_fit(self, learn):
            learn.lr = 0.0  # no movement at all

        def before_batch(self, learn):
            x, y = learn.batch
            learn.batch = (x * 0, y)

    learn = make_learner(cbs=[Tweak()])
    before = learn.model.weight.detach().clone()
    learn.fit(1)
    assert learn.opt.param_groups[0]["lr"] == 0.0 and torch.equal(before, learn.model.weight)


def test_fit_lr_sets_the_optimizer():
    learn = make_learner()
    learn.fit(1, lr=0.05)
    assert learn.lr == 0.05 and learn.opt.param_groups[0]["lr"] == 0.05


def test_train_step_pieces_are_replaceable():
    class ScaledLoss(TrainStep):
        def get_loss(self, learn):
            learn.loss = 0.0 * learn.loss_func(learn.preds, learn.yb)

    learn = make_learner(train_step=ScaledLoss())
    before = learn.model.weight.detach().clone()
    learn.fit(1)
    assert torch.equal(before, learn.model.weight)  # zero loss -> zero gradient -> no change


def test_train_step_swapped_by_a_callback():
    steps = []

    class CountingStep(TrainStep):
        def step(self, learn):
            steps.append(learn.train_iter)
            super().step(learn)

    class Swap(Callback):
        def before_fit(self, learn):
            self.saved, learn.train_step = learn.train_step, CountingStep()

        def cleanup_fit(self, learn):
            learn.train_step = self.saved

    learn = make_learner(n_train=3, cbs=[Swap()])
    learn.fit(1)
    assert steps == [0, 1, 2] and type(learn.train_step) is TrainStep


def test_accepts_a_torch_dataloader():
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    seen = []

    class Count(Callback):
        def after_batch(self, learn):
            seen.append((learn.training, len(learn.yb)))

    Learner(nn.Linear(3, 2), DataLoaders(dl, dl), lr=0.1, cbs=[Count()]).fit(1)
    assert seen == [(True, 8), (True, 8), (True, 4), (False, 8), (False, 8), (False, 4)]


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_epochs_must_be_positive(n):
    with pytest.raises(ConfigError, match="positive integer"):
        make_learner().fit(n)


def test_show_training_loop_lists_callbacks_at_their_events(capsys):
    class A(Callback):
        def after_loss(self, learn):
            pass

    text = make_learner(cbs=[A()]).show_training_loop()
    assert "after_loss: A" in text and text.splitlines()[0].startswith("before_fit")
    assert capsys.readouterr().out.strip() == text
