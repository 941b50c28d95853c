"""A bounded history of statistics rows: the last `recent` rows at full resolution, older ones merged.

However long the run, the store holds at most `max_rows` rows. When a new block would not fit, the rows
older than the `recent` window are merged in adjacent pairs, halving that region; repeated, this keeps a
uniformly downsampled picture of the whole run plus full detail of its end. Each row carries `steps` (the
training step of its last member) and `weights` (how many recorded steps it stands for), so a merged row
is an aggregate of known size, not a silently dropped sample.
"""
from __future__ import annotations

import numpy as np

# How each field merges two rows (NaN marks "not measured" and is ignored where the other row has a value):
#   "mean": weighted mean;  "std": pooled standard deviation, needs the field's mean (see STD_OF);
#   "min" / "max": of the two;  "sum": total;  "last": the later row's value.
MERGE_RULES = ("mean", "std", "min", "max", "sum", "last")


def _weighted_mean(a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    wa = np.where(np.isnan(a), 0.0, wa)
    wb = np.where(np.isnan(b), 0.0, wb)
    total = wa + wb
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.nan_to_num(a) * wa + np.nan_to_num(b) * wb) / total  # 0/0 = NaN: neither was measured


def merge_pair(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rules: dict[str, str],
               std_of: dict[str, str]) -> dict[str, np.ndarray]:
    """Merge row(s) `a` with the later row(s) `b`, field by field (arrays of equal shape, rows first).

    The pooled std treats each row as an equal-sized sample: E[x^2] = std^2 + mean^2 is averaged with the
    row weights, and std = sqrt(E[x^2] - mean^2) of the merged row.
    """
    wa, wb = a["weights"].astype(np.float64), b["weights"].astype(np.float64)
    merged = {"steps": b["steps"], "weights": a["weights"] + b["weights"]}
    for key, rule in rules.items():
        x, y = a[key], b[key]
        shape = (-1,) + (1,) * (x.ndim - 1)
        w1, w2 = wa.reshape(shape), wb.reshape(shape)
        if rule == "mean":
            value = _weighted_mean(x, y, w1, w2)
        elif rule == "std":
            mx, my = a[std_of[key]], b[std_of[key]]
            second = _weighted_mean(x.astype(np.float64) ** 2 + mx ** 2, y.astype(np.float64) ** 2 + my ** 2, w1, w2)
            mean = _weighted_mean(mx, my, w1, w2)
            value = np.sqrt(np.maximum(second - mean.astype(np.float64) ** 2, 0.0))
        elif rule == "min":
            value = np.fmin(x, y)
        elif rule == "max":
            value = np.fmax(x, y)
        elif rule == "sum":
            value = np.where(np.isnan(x) & np.isnan(y), np.nan, np.nan_to_num(x) + np.nan_to_num(y))
        elif rule == "last":
            value = y
        else:
            raise ValueError(f"unknown merge rule {rule!r} for {key!r}; rules are {MERGE_RULES}")
        merged[key] = value.astype(x.dtype)
    return merged


class HistoryStore:
    """Rows of named fields, each field an array whose first axis is the row.

    `rules` maps each field to a merge rule (MERGE_RULES); `std_of` maps a "std" field to its mean field.
    Arrays grow by doubling up to `max_rows` rows, so memory is bounded by `max_rows` from the start.
    """

    def __init__(self, rules: dict[str, str], *, std_of: dict[str, str] | None = None, recent: int = 1024,
                 max_rows: int = 4096):
        if recent < 0 or max_rows < recent + 2:
            raise ValueError(f"need 0 <= recent and max_rows >= recent + 2, got recent={recent}, max_rows={max_rows}")
        self.rules, self.std_of = dict(rules), dict(std_of or {})
        self.recent, self.max_rows = recent, max_rows
        self.n = 0
        self._data: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays (their allocated size)."""
        return 0 if self._data is None else sum(a.nbytes for a in self._data.values())

    def append(self, steps: np.ndarray, fields: dict[str, np.ndarray], weights: np.ndarray | None = None) -> None:
        """Add rows: `steps` (n,), each field (n, ...); `weights` defaults to 1 per row."""
        steps = np.asarray(steps, dtype=np.int64)
        weights = np.ones_like(steps) if weights is None else np.asarray(weights, dtype=np.int64)
        missing = set(self.rules) - set(fields)
        if missing:
            raise ValueError(f"rows lack the fields {sorted(missing)}")
        block = {"steps": steps, "weights": weights, **{k: np.asarray(fields[k]) for k in self.rules}}
        chunk = self.max_rows - self.recent - 1  # what always fits once the old region is merged down to 1 row
        for start in range(0, len(steps), chunk):
            self._append_chunk({k: v[start:start + chunk] for k, v in block.items()})

    def _append_chunk(self, block: dict[str, np.ndarray]) -> None:
        n = len(block["steps"])
        while self.n + n > self.max_rows:
            self._merge_old_rows()
        self._reserve(self.n + n, block)
        for key, value in block.items():
            self._data[key][self.n:self.n + n] = value
        self.n += n

    def _reserve(self, rows: int, like: dict[str, np.ndarray]) -> None:
        capacity = 0 if self._data is None else len(self._data["steps"])
        if rows <= capacity:
            return
        capacity = min(max(rows, 2 * capacity, 64), self.max_rows)
        grown = {k: np.empty((capacity,) + v.shape[1:], dtype=v.dtype) for k, v in like.items()}
        if self._data is not None:
            for key, value in self._data.items():
                grown[key][:self.n] = value[:self.n]
        self._data = grown

    def _merge_old_rows(self) -> None:
        """Merge the rows before the recent window in adjacent pairs (an odd one out stays as it is)."""
        old = self.n - self.recent
        pairs = old // 2
        if pairs == 0:
            raise RuntimeError("nothing left to merge: max_rows is too small for the recent window")
        d = self._data
        first = {k: v[0:2 * pairs:2] for k, v in d.items()}
        second = {k: v[1:2 * pairs:2] for k, v in d.items()}
        merged = merge_pair(first, second, self.rules, self.std_of)
        rest = self.n - 2 * pairs
        for key, value in d.items():
            value[:pairs] = merged[key]
            value[pairs:pairs + rest] = value[2 * pairs:self.n].copy()
        self.n = pairs + rest

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the stored rows, oldest first: `steps`, `weights` and every field."""
        if self._data is None:
            return {}
        return {k: v[:self.n].copy() for k, v in self._data.items()}
