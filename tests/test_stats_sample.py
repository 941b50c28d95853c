"""SampleBlock: what it copies out of a tensor, and that its summary equals a direct computation on
exactly those values."""
import numpy as np
import pytest
import torch

from deepscope.dead import off_rule
from deepscope.stats.sample import RUN, SampleBlock, largest_prime_at_most


def block(n_tensors=2, n_acts=1, size=64, steps=2, hist_range=(0.0, 10.0), bins=40, seed=0, rules=None):
    rules = rules or [off_rule(torch.nn.Identity(), 1e-3)] * n_acts  # |a| <= 1e-3 is off
    return SampleBlock(n_tensors, n_acts, size, torch.device("cpu"), rules=rules,
                       hist_range=hist_range, bins=bins, steps=steps, seed=seed)


def direct(x, hist_range=(0.0, 10.0), bins=40):
    """TENSOR_COLUMNS and the histogram row (non-finite count first), computed plainly."""
    x = x.double()
    finite = x[torch.isfinite(x)]
    a = finite.abs().clamp(*hist_range)
    hist = torch.histc(a, bins, *hist_range)
    nonfinite = float((~torch.isfinite(x)).sum())
    cols = [x.sum(), x.norm(), x.min(), x.max(), (x.abs() <= 1e-3).sum(), nonfinite]
    return np.array([float(c) for c in cols]), np.concatenate([[nonfinite], hist.numpy()])


def summary(blk, n_tensors, n_acts, bins=40):
    out = torch.full((blk.pending, n_tensors, 6), float("nan"))
    hist = torch.full((blk.pending, n_acts, bins + 1), float("nan"))
    blk.summarise(out, hist)
    return out.double().numpy(), hist.double().numpy()


def test_largest_prime():
    assert [largest_prime_at_most(n) for n in (2, 3, 10, 13, 100, 196)] == [2, 3, 7, 13, 97, 193]


def test_big_tensors_are_sampled_in_runs_along_a_prime_lattice_and_summarised_exactly():
    g = torch.Generator().manual_seed(0)
    act = (torch.randn(64, 16, 6, 6, generator=g) * 3).contiguous(memory_format=torch.channels_last)
    act[act.abs() < 0.5] = 0.0                      # some dead values
    grad = torch.randn(64, 16, 6, 6, generator=g)
    blk = block(size=256)
    blk.open()
    assert blk.put(0, [act]) == (256, act.numel()) and blk.put(1, [grad]) == (256, grad.numel())
    sample = blk.values[0, 0].clone()
    # every run of RUN values is RUN neighbours in memory, and runs start a prime step apart
    memory = act.permute(0, 2, 3, 1).reshape(-1)     # channels_last memory order
    starts = [int(torch.nonzero((memory.unfold(0, RUN, 1) == run).all(1))[0]) for run in sample.view(-1, RUN)]
    steps = set(np.diff(starts))
    assert steps == {largest_prime_at_most(act.numel() // (256 // RUN))}
    out, hist = summary(blk, 2, 1)
    want, want_hist = direct(sample)
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-5)
    np.testing.assert_array_equal(hist[0, 0], want_hist)
    gwant, _ = direct(blk.values[1, 0])
    np.testing.assert_allclose(out[0, 1, [0, 1, 5]], gwant[[0, 1, 5]], rtol=1e-5)


def test_the_lattice_moves_every_step_and_does_not_lock_onto_channels():
    x = torch.arange(16.0).repeat(64 * 7 * 7).view(64, 7, 7, 16).permute(0, 3, 1, 2)  # channels_last: value = channel
    assert x.is_contiguous(memory_format=torch.channels_last)
    blk = block(n_tensors=1, size=512, steps=8)
    seen = []
    for _ in range(8):
        blk.open()
        blk.put(0, [x])
    for k in range(8):
        counts = torch.bincount(blk.values[0, k].long(), minlength=16)
        assert counts.min() >= 512 / 16 * 0.5         # every channel sampled, none much more than others
        seen.append(blk.values[0, k].clone())
    assert not all(torch.equal(seen[0], s) for s in seen[1:])


def test_small_tensors_are_copied_whole_and_their_padding_is_reported():
    blk = block(size=64)
    blk.open()
    x = torch.tensor([[3.0, -2.0, 0.0], [12.0, 0.0005, 1.0]])  # 6 values: min 3.0 must not become 0
    assert blk.put(0, [x + 5.0]) == (6, 6)
    out, hist = summary(blk, 2, 1)
    want, want_hist = direct(x + 5.0)
    np.testing.assert_allclose(out[0, 0, [0, 1, 2, 3, 5]], want[[0, 1, 2, 3, 5]], rtol=1e-6)
    assert out[0, 0, 4] == want[4] + 58                 # the 58 zeros of padding count as dead...
    assert hist[0, 0, 1] == want_hist[1] + 58           # ...and in the first bin: DeviceRows.read subtracts them
    np.testing.assert_array_equal(hist[0, 0, 2:], want_hist[2:])


def test_non_finite_values_and_a_histogram_range_above_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) * 4
    x[::7] = float("nan")
    x[3::11] = float("inf")
    x[5::13] = -float("inf")
    blk = block(size=512, hist_range=(1.0, 6.0), bins=10)
    blk.open()
    blk.put(0, [x])
    blk.put(1, [x])
    sample = blk.values[0, 0].clone()
    out, hist = summary(blk, 2, 1, bins=10)
    _, want_hist = direct(sample, (1.0, 6.0), 10)
    assert out[0, 0, 5] == hist[0, 0, 0] == (~torch.isfinite(sample)).sum() > 0
    np.testing.assert_array_equal(hist[0, 0], want_hist)  # |x| < 1 lands in the first bin, > 6 in the last
    assert out[0, 1, 5] == (~torch.isfinite(blk.values[1, 0])).sum()


def test_between_one_and_two_samples_positions_are_random_and_several_outputs_are_joined():
    blk = block(n_tensors=1, size=64)
    blk.open()
    a, b = torch.arange(50.0), torch.arange(50.0, 100.0)  # 100 values: too few for a lattice of runs
    assert blk.put(0, [a, b]) == (64, 100)
    sample = blk.values[0, 0]
    assert set(sample.tolist()) <= set(range(100)) and len(set(sample.tolist())) > 30


def test_a_partial_block_and_reuse_after_summarising():
    blk = block(size=64, steps=4)
    tensors = [torch.randn(4, 10) for _ in range(3)]  # 40 values: copied whole
    for t in tensors:
        blk.open()
        blk.put(0, [t])
        blk.put(1, [t * 2])
    out, hist = summary(blk, 2, 1)
    assert out.shape[0] == 3 and blk.pending == 0
    for k, t in enumerate(tensors):
        np.testing.assert_allclose(out[k, 0, 0], float(t.sum()), rtol=1e-5)
        np.testing.assert_allclose(out[k, 1, 1], float((t * 2).norm()), rtol=1e-5)
    blk.open()
    blk.put(0, [torch.ones(3)])                       # fewer values than before: the old ones are zeroed
    blk.put(1, [torch.ones(3)])
    out, _ = summary(blk, 2, 1)
    assert out[0, 0, 0] == 3.0 and out[0, 0, 2] == 1.0 and out[0, 1, 0] == 3.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs(dtype):
    blk = block(size=64)
    blk.open()
    x = torch.randn(1000).to(dtype)
    blk.put(0, [x])
    blk.put(1, [x])
    out, _ = summary(blk, 2, 1)
    np.testing.assert_allclose(out[0, 0, 0], float(blk.values[0, 0].double().sum()), rtol=1e-5)
