import sys

import numpy as np
import pytest
import torch
from torch import nn

from deepscope.callback import Callback
from deepscope.data import DataLoaders
from deepscope.errors import DataError
from deepscope.learner import Learner
from deepscope.stats import DEAD_THRESHOLD, FORMAT_VERSION, ActivationStats, HistoryStore, Stats, load_stats
from deepscope.stats.engine import MERGE, STD_OF
from deepscope.stats.store import merge_pair


def tiny_model():
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 3))


def batches(n, bs=8, scale=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=g) * scale, torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def learner(cbs, n_train=6, n_valid=2, **kw):
    dls = DataLoaders(train=batches(n_train), valid=batches(n_valid, seed=1))
    return Learner(tiny_model(), dls, lr=0.05, cbs=cbs, **kw)


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


class Direct(Callback):
    """Captures, with plain torch hooks, what ActivationStats should have summarised at each step."""
    order = 50

    def before_fit(self, learn):
        self.acts, self.grads, self.params = [], [], []
        self.handles = [m.register_forward_hook(self._fwd) for m in learn.model]

    def _fwd(self, module, inputs, output):
        if module.training:
            self.acts[-1][module] = output.detach().clone()
            output.register_hook(lambda g, module=module: self.grads[-1].__setitem__(module, g.clone()))

    def before_batch(self, learn):
        self.acts.append({}), self.grads.append({})

    def after_backward(self, learn):
        self.before = {m: [p.detach().clone() for p in m.parameters()] for m in learn.model if any(True for _ in m.parameters())}
        self.grad_now = {m: [p.grad.clone() for p in m.parameters()] for m in self.before}

    def after_step(self, learn):
        self.params.append({m: (old, [p.detach().clone() for p in m.parameters()], self.grad_now[m]) for m, old in self.before.items()})

    def cleanup_fit(self, learn):
        for h in self.handles:
            h.remove()


def norm(ts):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).item()


@pytest.mark.parametrize("subsample", [4096, None])  # tensors copied whole into the sample block; exact reductions
def test_every_statistic_matches_a_direct_computation(subsample):
    from deepscope.dead import off_rule

    stats_cb, direct = ActivationStats(flush_every=4, subsample=subsample), Direct()
    learn = learner([stats_cb, direct], opt_func=torch.optim.AdamW)
    learn.fit(1)
    s = stats_cb.stats()
    model = learn.model
    assert s.modules == ["0", "1", "2", "3", "4"] and s.param_modules == ["0", "2", "4"]
    assert s.steps.tolist() == list(range(6)) and s.weights.tolist() == [1] * 6
    assert s.act_hist.shape == (6, 5, 40) and np.allclose(s.hist_edges, np.linspace(0, 10, 41))
    close = dict(rtol=1e-4, atol=1e-5)
    for t in range(6):
        for i, module in enumerate(model):
            a = direct.acts[t][module]
            np.testing.assert_allclose(s.act_mean[t, i], a.mean().item(), **close)
            np.testing.assert_allclose(s.act_std[t, i], a.std().item(), **close)
            assert s.act_min[t, i] == a.min().item() and s.act_max[t, i] == a.max().item()
            # off by the module's own rule (deepscope.dead): ReLU's floor, |a| <= tolerance for Linear
            assert s.act_dead[t, i] == pytest.approx(off_rule(module).off(a).float().mean().item())
            assert s.act_nonfinite[t, i] == 0
            hist = torch.histc(a.abs().clamp(0, 10), 40, 0, 10)  # values beyond 10 land in the last bin
            np.testing.assert_array_equal(s.act_hist[t, i], hist.numpy())
            g = direct.grads[t][module]
            np.testing.assert_allclose(s.grad_mean[t, i], g.mean().item(), **close)
            np.testing.assert_allclose(s.grad_std[t, i], g.std().item(), **close)
            np.testing.assert_allclose(s.grad_norm[t, i], g.norm().item(), **close)
            assert s.grad_nonfinite[t, i] == 0
        for j, name in enumerate(s.param_modules):
            old, new, grad = direct.params[t][model[int(name)]]
            np.testing.assert_allclose(s.weight_norm[t, j], norm(old), **close)  # the weights this step ran with
            np.testing.assert_allclose(s.param_grad_norm[t, j], norm(grad), **close)
            np.testing.assert_allclose(s.update_ratio[t, j], norm([n - o for n, o in zip(new, old)]) / norm(old), **close)
    assert s.act_hist[:, :, -1].sum() > 0 and (s.act_dead[:, 1] > 0.2).all()  # the test exercises clamping and dead ReLUs
    assert s.last()["2"]["update_ratio"] == pytest.approx(float(s.update_ratio[-1, 1]))
    assert s.last()["1"]["update_ratio"] is None and s.last()["1"]["dead"] == pytest.approx(float(s.act_dead[-1, 1]))


def test_non_finite_activations_are_counted_and_left_out_of_the_histogram():
    class Blowup(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[0, 0], x[0, 1], x[1, 0] = float("inf"), float("nan"), -float("inf")
            return x

    model = nn.Sequential(nn.Linear(5, 5), Blowup(), nn.ReLU())
    stats_cb = ActivationStats(modules=lambda name, m: name in ("1", "2"), train=False, valid=True)
    learn = Learner(model, DataLoaders(train=[], valid=batches(1)), cbs=[stats_cb])
    learn.fit(1, train=False, valid=True)
    v = stats_cb.stats().valid
    assert v["valid_act_nonfinite"][0].tolist() == [3, 2]  # ReLU maps -inf to 0, keeps inf and NaN
    assert v["valid_act_hist"][0, 0].sum() == 8 * 5 - 3


class SyncGuard:
    """Counts host synchronisations (item, cpu, tolist, numpy, bool/float/int of a tensor) called from
    files whose path contains `marker`, except inside functions named in `allowed` (the block read-back)."""

    METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch, marker, allowed=("read",)):
        self.calls = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original, marker, allowed))

    def _wrap(self, name, original, marker, allowed):
        def wrapper(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_code.co_name in allowed:
                    break
                if marker in frame.f_code.co_filename.replace("\\", "/"):
                    self.calls.append((name, frame.f_code.co_name))
                    break
                frame = frame.f_back
            return original(tensor, *args, **kwargs)
        return wrapper


@pytest.mark.parametrize("subsample", [4096, 16, None])  # whole copies, lattice samples, exact reductions
def test_no_host_sync_inside_the_step(monkeypatch, subsample):
    # off_rule reads f(0) of each activation once, when the hooks go on (before_fit), never in a step
    guard = SyncGuard(monkeypatch, "deepscope/stats/", allowed=("read", "off_rule"))
    stats_cb = ActivationStats(valid=True, flush_every=4, subsample=subsample)
    learn = learner([stats_cb], n_train=9)
    learn.fit(2)
    assert guard.calls == []
    assert len(stats_cb.stats().steps) == 18


def test_sync_guard_catches_a_sync(monkeypatch):
    guard = SyncGuard(monkeypatch, "tests/test_stats.py")
    bool(torch.ones(()) > 0), torch.ones(2).tolist()
    assert [name for name, _ in guard.calls] == ["__bool__", "tolist"]


@pytest.mark.gpu
def test_no_cuda_sync_inside_the_step():
    from deepscope.callbacks import DeviceCallback

    stats_cb = ActivationStats(flush_every=100)

    class SyncDebug(Callback):
        order = -30

        def before_batch(self, learn):
            torch.cuda.set_sync_debug_mode("error")

        def cleanup_batch(self, learn):
            torch.cuda.set_sync_debug_mode("default")

    learn = learner([DeviceCallback("cuda"), stats_cb, SyncDebug()])
    try:
        learn.fit(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(stats_cb.stats().steps) == 6


def test_hooks_removed_after_fit_and_after_an_error_mid_fit():
    stats_cb = ActivationStats()
    learn = learner([stats_cb])
    learn.fit(1)
    assert no_hooks_left(learn.model)

    class Fail(Callback):
        def after_step(self, learn):
            if learn.train_iter == 2:
                raise RuntimeError("boom")

    stats_cb = ActivationStats()
    learn = learner([stats_cb, Fail()])
    with pytest.raises(Exception, match="boom"):
        learn.fit(1)
    assert no_hooks_left(learn.model)
    assert stats_cb.stats().steps.tolist() == [0, 1, 2]  # what was recorded before the error is kept


def test_every_n_steps_and_train_valid_options():
    stats_cb = ActivationStats(every=3)
    learner([stats_cb], n_train=7).fit(2)
    s = stats_cb.stats()
    assert s.steps.tolist() == [0, 3, 6, 9, 12] and s.valid is None

    stats_cb = ActivationStats(train=False, valid=True)
    learner([stats_cb], n_train=4, n_valid=3).fit(2)
    s = stats_cb.stats()
    assert len(s.steps) == 0 and s.act_mean.shape == (0, 5)
    assert s.valid["valid_steps"].tolist() == [4, 4, 4, 8, 8, 8]
    assert np.isfinite(s.valid["valid_act_mean"]).all()


def wide_batches(n, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def test_sampled_statistics_leave_training_unchanged_and_estimate_the_whole():
    """Outputs of 64x256 values, sampled 512 at a time: the losses are exactly those of a run without
    statistics (the sampler has its own random state), and the estimates are close to exact statistics."""
    def run(cbs):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 256), nn.ReLU(), nn.Linear(256, 3))
        losses = []

        class Losses(Callback):
            def after_loss(self, learn):
                losses.append(learn.loss.item())

        Learner(model, DataLoaders(train=wide_batches(6), valid=None), lr=0.1, cbs=[*cbs, Losses()]).fit(1)
        return losses

    sampled, exact = ActivationStats(subsample=512), ActivationStats(subsample=None)
    plain, with_sampled, with_exact = run([]), run([sampled]), run([exact])
    assert with_sampled == plain and with_exact == plain
    s, e = sampled.stats(), exact.stats()
    assert (s.act_hist[:, :2].sum(-1) == 512).all()      # 16384 values per output, 512 summarised
    assert (s.act_hist[:, 2].sum(-1) == 64 * 3).all()    # the logits are fewer: summarised whole
    np.testing.assert_array_equal(s.act_mean[:, 2], e.act_mean[:, 2])
    assert (np.abs(s.act_mean[:, :2] - e.act_mean[:, :2]) < 0.2 * e.act_std[:, :2]).all()  # ~4.5 standard errors
    np.testing.assert_allclose(s.act_std[:, :2], e.act_std[:, :2], rtol=0.15)
    np.testing.assert_allclose(s.act_dead[:, 1], e.act_dead[:, 1], atol=0.07)  # ~0.5 dead after the ReLU
    np.testing.assert_allclose(s.grad_norm, e.grad_norm, rtol=0.2)  # sqrt(N/n) * norm of the sample
    np.testing.assert_allclose(s.update_ratio, e.update_ratio, rtol=1e-6)  # parameters are never sampled


def test_unknown_module_names_are_an_error():
    from deepscope.errors import ConfigError

    with pytest.raises(Exception, match="no module of the model matches"):
        learner([ActivationStats(modules=["nope*"])]).fit(1)
    with pytest.raises(ConfigError):
        ActivationStats(every=0)


def fake_rows(start, n, M=3, B=4, P=2, rng=None):
    shapes = {"act_hist": (n, M, B), "weight_norm": (n, P), "param_grad_norm": (n, P), "update_ratio": (n, P)}
    fields = {k: rng.random(shapes.get(k, (n, M))).astype(np.float32) for k in MERGE}
    return np.arange(start, start + n), fields


def test_store_memory_is_bounded_and_merged_rows_keep_aggregates():
    rng = np.random.default_rng(0)
    store = HistoryStore(MERGE, std_of=STD_OF, recent=256, max_rows=1024)
    total_hist, total_mean, overall_min, overall_max, sizes = 0.0, 0.0, np.inf, -np.inf, {}
    for start in range(0, 100_000, 64):
        steps, fields = fake_rows(start, 64, rng=rng)
        total_hist += fields["act_hist"].astype(np.float64).sum()
        total_mean += fields["act_mean"].astype(np.float64).sum(0)
        overall_min, overall_max = np.minimum(overall_min, fields["act_min"].min(0)), np.maximum(overall_max, fields["act_max"].max(0))
        store.append(steps, fields)
        assert len(store) <= 1024
        if start + 64 in (10_048, 100_032):
            sizes[start + 64] = store.nbytes
    assert sizes[10_048] == sizes[100_032]
    a = store.arrays()
    n = 100_032
    assert a["weights"].sum() == n and a["steps"][-1] == n - 1 and (np.diff(a["steps"]) > 0).all()
    assert (a["weights"][-256:] == 1).all() and a["weights"].max() > 1  # recent rows exact, old ones merged
    np.testing.assert_allclose(a["act_hist"].astype(np.float64).sum(), total_hist, rtol=1e-5)
    np.testing.assert_allclose((a["act_mean"] * a["weights"][:, None]).sum(0) / n, total_mean / n, rtol=1e-4)
    np.testing.assert_array_equal(a["act_min"].min(0), overall_min)
    np.testing.assert_array_equal(a["act_max"].max(0), overall_max)


def test_merge_pair_pools_std_and_ignores_missing_values():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 11.0, 12.0, 14.0])
    row = lambda v, w, step: {"steps": np.array([step]), "weights": np.array([w]), "act_mean": np.array([v.mean()], np.float32),
                              "act_std": np.array([v.std()], np.float32), "grad_norm": np.array([np.nan if step == 1 else 5.0], np.float32)}
    rules = {"act_mean": "mean", "act_std": "std", "grad_norm": "mean"}
    merged = merge_pair(row(x, 1, 1), row(y, 1, 2), rules, {"act_std": "act_mean"})
    both = np.concatenate([x, y])
    assert merged["steps"][0] == 2 and merged["weights"][0] == 2
    assert merged["act_mean"][0] == pytest.approx(both.mean()) and merged["act_std"][0] == pytest.approx(both.std(), rel=1e-6)
    assert merged["grad_norm"][0] == 5.0  # NaN means "not measured", not zero


def test_save_load_round_trip_and_bad_files(tmp_path):
    stats_cb = ActivationStats(valid=True)
    learner([stats_cb]).fit(1)
    path = stats_cb.save(tmp_path / "run")
    assert path == tmp_path / "run" / "stats.npz"
    s, loaded = stats_cb.stats(), load_stats(tmp_path / "run")
    assert isinstance(loaded, Stats) and loaded.modules == s.modules and loaded.param_modules == s.param_modules
    for key in ("steps", "weights", "act_mean", "act_hist", "grad_norm", "update_ratio", "hist_edges"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(s, key))
    assert loaded.dead_threshold == s.dead_threshold and set(loaded.valid) == set(s.valid)
    with np.load(path) as data:
        arrays = dict(data)
    assert int(arrays["format_version"]) == FORMAT_VERSION
    np.savez(tmp_path / "old.npz", **{**arrays, "format_version": np.array(99)})
    with pytest.raises(DataError, match="version 99"):
        load_stats(tmp_path / "old.npz")
    np.savez(tmp_path / "partial.npz", **{k: v for k, v in arrays.items() if k != "grad_norm"})
    with pytest.raises(DataError, match="grad_norm"):
        load_stats(tmp_path / "partial.npz")
    with pytest.raises(DataError, match="no statistics"):
        load_stats(tmp_path / "empty")


def test_a_cancelled_step_has_activations_but_no_gradient_or_parameter_statistics():
    from deepscope.callback import CancelBatchException

    class CancelAfterLoss(Callback):
        order = 50

        def after_loss(self, learn):
            if learn.train_iter == 2:
                raise CancelBatchException()

    stats_cb = ActivationStats(flush_every=3)          # blocks of 3: the cancelled step is the last of one
    learner([stats_cb, CancelAfterLoss()], n_train=6).fit(1)
    s = stats_cb.stats()
    assert s.steps.tolist() == [0, 1, 2, 3, 4, 5]
    assert np.isfinite(s.act_mean).all()
    assert np.isnan(s.grad_norm[2]).all() and np.isnan(s.update_ratio[2]).all()
    assert np.isfinite(np.delete(s.grad_norm, 2, axis=0)).all() and np.isfinite(np.delete(s.update_ratio, 2, axis=0)).all()


@pytest.mark.parametrize("n", [5, 1024, 3000, 70_001])  # below, at and past the lane period, with a tail
@pytest.mark.parametrize("hist_range, bins", [((0.0, 10.0), 40), ((0.5, 3.0), 7)])
def test_exact_reductions_match_a_direct_torch_computation(n, hist_range, bins):
    from deepscope.stats.collect import activation_stats, gradient_stats

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).relu_() - torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    x[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), DEAD_THRESHOLD, 0.0])[:n]
    out, hist = torch.full((6,), 7.0), torch.zeros(bins + 1)
    from deepscope.dead import off_rule

    zero_rule = off_rule(torch.nn.Identity(), DEAD_THRESHOLD)        # no floor: |a| <= tolerance is off
    activation_stats(x, zero_rule, hist_range, out, hist)
    finite = x[torch.isfinite(x)]
    assert hist[0] == out[5] == (~torch.isfinite(x)).sum()
    np.testing.assert_array_equal(hist[1:], torch.histc(finite.abs().clamp(*hist_range), bins, *hist_range))
    assert out[4] == (x.abs() <= DEAD_THRESHOLD).sum()             # NaN is not dead, 1e-3 itself is
    assert out[2].isnan() and out[3].isnan()                        # NaN propagates into min and max, as in torch
    f = x.clone().nan_to_num_(0.0, 0.0, 0.0)                        # sum and norm of the finite values
    out_f = torch.full((6,), 7.0)
    activation_stats(f, zero_rule, hist_range, out_f, torch.zeros(bins + 1))
    torch.testing.assert_close(out_f[:2], torch.stack([f.double().sum(), f.double().norm()]).float())
    assert out_f[2] == f.min() and out_f[3] == f.max() and out_f[5] == 0
    grad = torch.full((6,), 7.0)
    gradient_stats(x, grad)
    assert grad[5] == 3 and grad[2:5].tolist() == [7.0] * 3         # min, max, dead untouched
    gradient_stats(f, grad)
    torch.testing.assert_close(grad[:2], out_f[:2])
    assert grad[5] == 0


class Interrupt(KeyboardInterrupt):
    """Stands in for the Ctrl-C / SIGTERM the CLI turns into an exception wherever Python is."""


@pytest.mark.parametrize("subsample", [4096, None])
@pytest.mark.parametrize("at_call", range(1, 14))
def test_an_interrupt_mid_step_keeps_the_record_and_stays_an_interrupt(subsample, at_call):
    """Whatever the step and the module the interrupt lands in, the fit ends with the interrupt itself (not
    a failure of ActivationStats' clean-up masking it), and the steps finished so far stay readable."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] == at_call:
            raise Interrupt()

    stats_cb = ActivationStats(flush_every=4, subsample=subsample)
    learn = learner([stats_cb], n_train=9)
    handle = learn.model[2].register_forward_hook(hook)  # once per step: the interrupt lands in step at_call - 1
    with pytest.raises(Interrupt):
        learn.fit(2, valid=False)
    handle.remove()
    s = stats_cb.stats()
    assert s.steps.tolist() == list(range(at_call))  # the cut step's row is finished by cleanup_batch
    assert np.isfinite(s.act_std[:-1]).all() and no_hooks_left(learn.model)


def test_a_step_left_open_is_dropped_when_the_hooks_go():
    from deepscope.stats import StatsRecorder

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    rec = StatsRecorder(model, flush_every=4)
    rec.attach()
    for step in range(7):
        rec.start_step(step)
        model(torch.randn(2, 3)).sum().backward()
        rec.before_update()
        rec.after_update()
        rec.end_step()
    rec.start_step(7)            # opened, never ended: an exception in the middle of the step
    model(torch.randn(2, 3))
    rec.close()
    assert rec.stats().steps.tolist() == list(range(7))


def test_an_interrupt_inside_the_engines_own_bookkeeping_stays_an_interrupt(monkeypatch):
    """A signal can land between two lines of the engine (here: after a block's samples are summarised,
    before the engine notes it): the clean-up must not fail on the half-updated state and mask it."""
    from deepscope.stats.sample import SampleBlock

    original, fired = SampleBlock.summarise, []

    def summarise_then_interrupt(self, out, hist_out):
        original(self, out, hist_out)
        if not fired:
            fired.append(True)
            raise Interrupt()

    monkeypatch.setattr(SampleBlock, "summarise", summarise_then_interrupt)
    stats_cb = ActivationStats(flush_every=4)
    learn = learner([stats_cb], n_train=9)
    with pytest.raises(Interrupt):
        learn.fit(2, valid=False)
    assert fired and no_hooks_left(learn.model)
    assert len(stats_cb.stats().steps) >= 4
