"""HistoryStore: bounded memory, the whole run visible on a uniform grid, merged rows equal to direct sums."""
import warnings

import numpy as np
import pytest

from deepscope.config import TrainConfig
from deepscope.hooks import select_modules
from deepscope.recipe import build_model
from deepscope.stats import ActivationStats, HistoryStore
from deepscope.stats.engine import MERGE, STD_OF
from deepscope.stats.params import ParamTracker
from deepscope.stats.rows import ACT_FIELDS, GRAD_FIELDS, PARAM_FIELDS
from deepscope.stats.store import merge_pair, merge_rows

RULES = {"mean": "mean", "std": "std", "lo": "min", "hi": "max", "hist": "sum", "seen": "last"}


def tiny_store(**kw) -> HistoryStore:
    return HistoryStore(RULES, std_of={"std": "mean"}, **kw)


def constant_block(start: int, n: int) -> tuple[np.ndarray, dict]:
    """Rows whose values do not matter: for the shape of the history only."""
    return np.arange(start, start + n), {k: np.zeros((n, 2), np.float32) for k in RULES}


def coverage(a: dict) -> np.ndarray:
    """Training steps each row covers, from the steps of consecutive rows (the run starts at step 0)."""
    return np.diff(a["steps"], prepend=-1)


def check_grid(store: HistoryStore, a: dict, n_steps: int) -> None:
    """Every row's weight is the steps it covers; merged rows all cover `span`; the window is exact."""
    w, recent = a["weights"], store.recent
    assert w.sum() == n_steps and a["steps"][-1] == n_steps - 1 and (np.diff(a["steps"]) > 0).all()
    assert len(w) == len(store) <= store.max_rows
    np.testing.assert_array_equal(coverage(a), w)
    assert (w[len(w) - recent:] == 1).all()                        # the window: one step per row
    merged = w[:store.n_merged]
    assert (merged == store.span).all()                            # a uniform grid: max/min span ratio 1
    assert store.merged_capacity // 2 <= store.n_merged <= store.merged_capacity
    assert len(w) - store.n_merged - recent in (0, 1)              # at most one pending row between them
    assert w[store.n_merged:len(w) - recent].sum() < store.span
    assert coverage(a).max() / n_steps <= 1 / (store.merged_capacity // 2) < 0.02   # 1/1535 by default: 0.07 %


@pytest.mark.parametrize("n_steps", [100_000, 1_000_000])
def test_no_row_covers_more_than_a_sliver_of_the_run(n_steps):
    """Blocks of 64 rows, as ActivationStats reads them back (flush_every); blocks of 8 in the test below."""
    store, sizes, worst, done = tiny_store(), {}, 0.0, 0
    while done < n_steps:
        store.append(*constant_block(done, 64))
        done += 64
        if done >= 5_000 and done % 4_096 == 0:                   # any length: checked along the way too
            a = store.arrays()
            worst = max(worst, coverage(a).max() / done)
        if done in (20_480, 100_032, 1_000_000):
            sizes[done] = store.nbytes
    a = store.arrays()
    check_grid(store, a, done)
    assert worst <= 1 / (store.merged_capacity // 2)
    # the start of the run stays visible: halving all old rows every round made the first row 82 % of 100k steps
    assert a["weights"][0] == store.span == {100_000: 64, 1_000_000: 512}[n_steps]
    row_bytes = len(RULES) * 2 * 4 + 16                             # float32 pairs, int64 steps and weights
    assert set(sizes.values()) == {store.max_rows * row_bytes}      # flat from 20k steps on, 100k or 1M


def raw_run(n_steps: int, rng) -> tuple[np.ndarray, dict, np.ndarray]:
    """Rows summarising 4 values per step and column, and the values themselves; std is over the 4 values
    (ddof=0), so the pooled std of a merged row is exactly the std of all its values. Column 2 is not
    measured (NaN) in every third stretch of 4096 steps: stretches aligned with the grid, because a row
    measured in only part of its steps counts with its whole weight when merged again (store.py says so)."""
    values = rng.normal(1.0, 1.0 + np.arange(3)[:, None], size=(n_steps, 3, 4)).astype(np.float32)
    values[(np.arange(n_steps) // 4096) % 3 == 0, 2] = np.nan
    edges = np.array([-np.inf, 0.0, 1.0, 2.0, np.inf])
    hist = ((values[..., None] > edges[:-1]) & (values[..., None] <= edges[1:])).sum(2)    # (n, 3, 4 bins)
    hist = np.where(np.isnan(values[..., :1]), np.nan, hist).astype(np.float32)
    fields = {"mean": values.mean(-1), "std": values.std(-1), "lo": values.min(-1), "hi": values.max(-1),
              "hist": hist, "seen": rng.random((n_steps, 2)).astype(np.float32)}
    return np.arange(n_steps), fields, values


def direct(values: np.ndarray, fields: dict, lo: int, hi: int, span: int) -> dict:
    """What the rows covering steps lo..hi-1, `span` steps each, must hold, straight from the raw values."""
    n = (hi - lo) // span
    v = values[lo:hi].reshape(n, span, 3, 4).transpose(0, 2, 1, 3).reshape(n, 3, span * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)             # all NaN: "mean of empty slice"
        out = {"mean": np.nanmean(v, -1), "std": np.nanstd(v, -1), "lo": np.nanmin(v, -1), "hi": np.nanmax(v, -1)}
    h = fields["hist"][lo:hi].reshape(n, span, 3, 4)
    out["hist"] = np.where(np.isnan(h).all(1), np.nan, np.nansum(h, 1))
    out["seen"] = fields["seen"][lo + span - 1:hi:span]
    return out


@pytest.mark.parametrize("block", [8, 100_000])
def test_merged_rows_equal_a_direct_computation_over_the_raw_rows(block):
    rng = np.random.default_rng(0)
    steps, fields, values = raw_run(100_000, rng)
    store = tiny_store()
    for start in range(0, len(steps), block):
        store.append(steps[start:start + block], {k: v[start:start + block] for k, v in fields.items()})
    a = store.arrays()
    check_grid(store, a, len(steps))
    S, m, n = store.span, store.n_merged, len(a["steps"])
    merged_end, window_start = m * S, len(steps) - store.recent
    parts = [(slice(0, m), 0, merged_end, S),                      # merged rows
             (slice(m, n - store.recent), merged_end, window_start, window_start - merged_end),  # pending
             (slice(n - store.recent, n), window_start, len(steps), 1)]  # the window: the raw rows
    for rows, lo, hi, span in parts:
        for key, value in direct(values, fields, lo, hi, span).items():
            np.testing.assert_allclose(a[key][rows], value, rtol=2e-5, atol=2e-5, err_msg=f"{key} of steps {lo}..{hi - 1}")
    unmeasured = np.isnan(a["mean"][:m, 2])
    assert 0.2 < unmeasured.mean() < 0.5                             # NaN rows were tested, not only values


def test_a_block_larger_than_the_store_gives_the_same_rows_as_small_blocks():
    rng = np.random.default_rng(1)
    steps, fields, _ = raw_run(30_000, rng)
    whole, pieces = tiny_store(recent=256, max_rows=1024), tiny_store(recent=256, max_rows=1024)
    whole.append(steps, fields)
    for start in range(0, len(steps), 7):                           # a block size that divides nothing
        pieces.append(steps[start:start + 7], {k: v[start:start + 7] for k, v in fields.items()})
    a, b = whole.arrays(), pieces.arrays()
    np.testing.assert_array_equal(a["steps"], b["steps"])
    np.testing.assert_array_equal(a["weights"], b["weights"])
    for key in RULES:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5)
    check_grid(whole, a, len(steps))


@pytest.mark.parametrize("recent, max_rows", [(0, 2), (0, 7), (3, 5), (16, 40)])
def test_small_stores_keep_their_bounds(recent, max_rows):
    rng = np.random.default_rng(2)
    store, done = tiny_store(recent=recent, max_rows=max_rows), 0
    while done < 5_000:
        n = int(rng.integers(1, 3 * max_rows))
        store.append(*constant_block(done, n))
        done += n
        a = store.arrays()
        assert len(a["steps"]) == len(store) <= max_rows and a["weights"].sum() == done
        np.testing.assert_array_equal(coverage(a), a["weights"])
        assert (a["weights"][len(a["weights"]) - min(recent, done):] == 1).all()
        assert (a["weights"][:store.n_merged] == store.span).all()
        assert store.nbytes <= max_rows * (2 * 4 * len(RULES) + 16)


def test_merge_pair_is_merge_rows_on_pairs():
    rng = np.random.default_rng(3)
    rows = {"steps": np.arange(6), "weights": np.array([1, 3, 2, 2, 5, 1]),
            **{k: rng.random((6, 2)).astype(np.float32) for k in RULES}}
    pairs = merge_pair({k: v[0::2] for k, v in rows.items()}, {k: v[1::2] for k, v in rows.items()}, RULES, {"std": "mean"})
    runs = merge_rows(rows, np.array([0, 2, 4]), RULES, {"std": "mean"})
    for key in rows:
        np.testing.assert_allclose(pairs[key], runs[key], rtol=1e-6)
    np.testing.assert_array_equal(runs["weights"], [4, 4, 6])


def test_a_mean_without_a_std_stays_out_of_the_pooled_std():
    """A module with one value has a mean but no (unbiased) std; the pooled std is over rows that have one."""
    row = lambda mean, std, step: {"steps": np.array([step]), "weights": np.array([1]),
                                   "mean": np.array([mean], np.float32), "std": np.array([std], np.float32)}
    merged = merge_pair(row(5.0, np.nan, 0), row(0.0, 1.0, 1), {"mean": "mean", "std": "std"}, {"std": "mean"})
    assert merged["std"][0] == pytest.approx(1.0) and merged["mean"][0] == pytest.approx(2.5)


def default_model_fields(n: int) -> dict:
    """Rows shaped as ActivationStats records them for the default model of `deepscope train`."""
    model = build_model(TrainConfig(), n_classes=10)
    M, P, B = len(select_modules(model)), len(ParamTracker(model).names), ActivationStats().hist_bins
    shapes = {"act_hist": (n, M, B), **{k: (n, P) for k in PARAM_FIELDS}}
    return {k: np.ones(shapes.get(k, (n, M)), np.float32) for k in ACT_FIELDS + GRAD_FIELDS + PARAM_FIELDS}


def test_memory_for_the_default_model_stays_under_12_mb():
    cb = ActivationStats()
    fields = default_model_fields(64)
    store = HistoryStore({k: MERGE[k] for k in fields}, std_of=STD_OF, recent=cb.recent, max_rows=cb.max_rows)
    row_bytes = 16 + sum(v[0].nbytes for v in fields.values())   # steps and weights: int64
    sizes = []
    for start in range(0, 3 * cb.max_rows, 64):                    # past the first pairing of merged rows
        store.append(np.arange(start, start + 64), fields)
        sizes.append(store.nbytes)
    # 2724 bytes a row (13 modules, 40 bins, 9 owning parameters): 11.2 MB, and never more at any length
    assert max(sizes) == sizes[-1] == cb.max_rows * row_bytes <= 12e6
    assert store.span > 1
