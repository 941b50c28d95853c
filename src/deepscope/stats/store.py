"""A bounded history of statistics rows: the last `recent` rows at full resolution, older ones merged on a
uniform grid.

Rows that leave the recent window are folded, oldest first, into merged rows that each cover the same
number of recorded steps, `span`; the rows gathered since the last merged row wait in one pending row
until they reach `span`. When the merged rows fill their share of the store, C = max_rows - recent - 1
rows, adjacent pairs are merged and `span` doubles. So at any length the store holds, oldest first:
merged rows of `span` recorded steps each (between C // 2 and C of them once the first pairing happened,
before which `span` is 1), at most one pending row of fewer steps, and the last `recent` rows of one step each.
Once the run is C // 2 recorded steps long, no row covers more than 1 / (C // 2) of it (0.07 % with
the defaults, C = 3071), and memory stays at `max_rows` rows however long the run (11.2 MB for the default
model of `deepscope train`). Halving all old rows at every round instead left the first row covering
most of the run: 82 % of it after 100k steps.

Each row carries `steps` (the training step of its last member) and `weights` (how many recorded steps it
stands for), so a merged row is an aggregate of known size, not a silently dropped sample. Coverage is
counted in `weights`: with rows appended at weight 1, as ActivationStats does, a merged row stands for
exactly `span` recorded steps; rows appended with other weights fall into merged rows by where their
cumulative weight starts, so a merged row may then hold more or less than `span`. A field that
is NaN ("not measured") in some of a merged row's steps is merged over the others, but the row then counts
with its whole weight when it is merged again.
"""
from __future__ import annotations

import numpy as np

# How each field merges a run of rows (NaN marks "not measured" and is ignored where another row has a value):
#   "mean": weighted mean;  "std": pooled standard deviation, needs the field's mean (see STD_OF);
#   "min" / "max": of the rows;  "sum": total;  "last": the latest row's value.
MERGE_RULES = ("mean", "std", "min", "max", "sum", "last")

Rows = dict[str, np.ndarray]


def _weighted_mean(x: np.ndarray, w: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per run of rows (starting at `starts`), the mean of x weighted by w, over the rows where x is not NaN."""
    measured = ~np.isnan(x)
    w = np.where(measured, w.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0)
    total = np.add.reduceat(w, starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.add.reduceat(np.where(measured, x, 0.0) * w, starts, axis=0) / total  # 0/0 = NaN: none measured


def merge_rows(rows: Rows, starts: np.ndarray, rules: dict[str, str], std_of: dict[str, str]) -> Rows:
    """Merge each run of consecutive rows, rows[starts[i]:starts[i + 1]] (the last run to the end), into one.

    `rows` holds `steps`, `weights` and the fields named in `rules`, rows first. The pooled std treats each
    row as a sample of its weight's size: E[x^2] = std^2 + mean^2 is averaged with the row weights over
    the rows that have a std, and std = sqrt(E[x^2] - mean^2) over those same rows.
    """
    starts = np.asarray(starts, dtype=np.intp)
    last = np.append(starts[1:], len(rows["steps"])) - 1  # the last row of each run
    w = rows["weights"].astype(np.float64)
    merged = {"steps": rows["steps"][last], "weights": np.add.reduceat(rows["weights"], starts)}
    for key, rule in rules.items():
        x = rows[key]
        if rule == "mean":
            value = _weighted_mean(x, w, starts)
        elif rule == "std":
            std = x.astype(np.float64)
            mean = np.where(np.isnan(std), np.nan, rows[std_of[key]].astype(np.float64))  # no std (1 value): left out
            second = _weighted_mean(std ** 2 + mean ** 2, w, starts)
            value = np.sqrt(np.maximum(second - _weighted_mean(mean, w, starts) ** 2, 0.0))
        elif rule == "min":
            value = np.fmin.reduceat(x, starts, axis=0)
        elif rule == "max":
            value = np.fmax.reduceat(x, starts, axis=0)
        elif rule == "sum":
            measured = np.logical_or.reduceat(~np.isnan(x), starts, axis=0)
            total = np.add.reduceat(np.where(np.isnan(x), 0.0, x.astype(np.float64)), starts, axis=0)
            value = np.where(measured, total, np.nan)
        elif rule == "last":
            value = x[last]
        else:
            raise ValueError(f"unknown merge rule {rule!r} for {key!r}; rules are {MERGE_RULES}")
        merged[key] = value.astype(x.dtype)
    return merged


def merge_pair(a: Rows, b: Rows, rules: dict[str, str], std_of: dict[str, str]) -> Rows:
    """Merge row(s) `a` with the later row(s) `b`, row by row (arrays of equal shape, rows first)."""
    keys = ("steps", "weights", *rules)
    pairs = {k: np.stack([a[k], b[k]], axis=1).reshape((-1,) + a[k].shape[1:]) for k in keys}  # a0 b0 a1 b1 ...
    return merge_rows(pairs, np.arange(0, len(pairs["steps"]), 2), rules, std_of)


class HistoryStore:
    """Rows of named fields, each field an array whose first axis is the row; at most `max_rows` rows.

    `rules` maps each field to a merge rule (MERGE_RULES); `std_of` maps a "std" field to its mean field.
    Oldest first, the rows are: `n_merged` merged rows of `span` recorded steps each, at most one pending
    row of fewer, and the last `recent` rows of one step each (see the module docstring for the bound).
    In the arrays the merged rows start at row 0 and the pending row follows them; the window sits at
    [start, end) and slides forward as rows leave its front, moved back next to the pending row only when
    it reaches the arrays' end. Arrays grow by doubling up to `max_rows` rows, so memory is bounded by
    `max_rows` from the start.
    """

    def __init__(self, rules: dict[str, str], *, std_of: dict[str, str] | None = None, recent: int = 1024,
                 max_rows: int = 4096):
        if recent < 0 or max_rows < recent + 2:
            raise ValueError(f"need 0 <= recent and max_rows >= recent + 2, got recent={recent}, max_rows={max_rows}")
        self.rules, self.std_of = dict(rules), dict(std_of or {})
        self.recent, self.max_rows = recent, max_rows
        self.merged_capacity = max_rows - recent - 1  # the window and the pending row take the rest
        self.span = 1                # recorded steps per merged row; doubles at each pairing
        self.n_merged = 0            # merged rows, at the start of the arrays
        self._pending = 0            # 1 if row n_merged gathers rows towards the next merged row
        self._start = self._end = 0  # the recent window, rows [_start, _end)
        self._data: Rows | None = None

    def __len__(self) -> int:
        return self.n_merged + self._pending + self._end - self._start

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays (their allocated size, at most `max_rows` rows)."""
        return 0 if self._data is None else sum(a.nbytes for a in self._data.values())

    def append(self, steps: np.ndarray, fields: dict[str, np.ndarray], weights: np.ndarray | None = None) -> None:
        """Add rows: `steps` (n,), each field (n, ...); `weights` defaults to 1 per row. Any n: the rows pushed
        out of the window (its oldest, then the block's own first rows) are merged."""
        steps = np.asarray(steps, dtype=np.int64)
        weights = np.ones_like(steps) if weights is None else np.asarray(weights, dtype=np.int64)
        missing = set(self.rules) - set(fields)
        if missing:
            raise ValueError(f"rows lack the fields {sorted(missing)}")
        block = {"steps": steps, "weights": weights, **{k: np.asarray(fields[k]) for k in self.rules}}
        window, n = self._end - self._start, len(steps)
        leaving = max(0, window + n - self.recent)
        from_window, from_block = min(leaving, window), max(0, leaving - window)
        if leaving:
            gone = {k: v[:from_block] for k, v in block.items()}
            if from_window:
                front = slice(self._start, self._start + from_window)
                gone = {k: np.concatenate([v[front], gone[k]]) for k, v in self._data.items()}
            self._start += from_window
            self._fold(gone)
            if self._start == self._end:  # the window emptied: it restarts after the merged and pending rows
                self._start = self._end = self.n_merged + self._pending
        block = {k: v[from_block:] for k, v in block.items()}
        n = n - from_block
        if n:
            self._make_room(n, block)
            for key, value in block.items():
                self._data[key][self._end:self._end + n] = value
            self._end += n

    def _fold(self, rows: Rows) -> None:
        """Fold rows that left the window (oldest first) into the pending row and new merged rows."""
        while len(rows["steps"]):
            if self._pending:  # the pending row opens the next merged row
                i = self.n_merged
                rows = {k: np.concatenate([v[i:i + 1], rows[k]]) for k, v in self._data.items()}
                self._pending = 0
            if self.n_merged == self.merged_capacity:
                self._pair_up()
                continue
            w = rows["weights"]
            group = (np.cumsum(w) - w) // self.span  # the merged row each row starts in, 0 = the next one
            starts = np.flatnonzero(np.diff(group, prepend=-1))  # the first row of each
            short = int(w.sum() < (group[-1] + 1) * self.span)   # 1 if the last has not reached `span` yet
            room = self.merged_capacity - self.n_merged
            if len(starts) - short > room:  # the merged rows fill up: fold what fits, pair up, then the rest
                new, pending, cut = room, 0, starts[room]
            else:                           # all fit; a short last one is the new pending row
                new, pending, cut = len(starts) - short, short, len(w)
            out = merge_rows({k: v[:cut] for k, v in rows.items()}, starts[:new + pending], self.rules, self.std_of)
            self._reserve(self.n_merged + new + pending, rows)
            for key, value in out.items():
                self._data[key][self.n_merged:self.n_merged + new + pending] = value
            self.n_merged, self._pending = self.n_merged + new, pending
            rows = {k: v[cut:] for k, v in rows.items()}

    def _pair_up(self) -> None:
        """Merge the merged rows in adjacent pairs and double `span`; an odd last one becomes the pending row
        (it covers the old span, less than the new one). Called when there is no pending row."""
        d, half = self._data, self.n_merged // 2
        if half:
            rows = {k: v[:2 * half] for k, v in d.items()}
            pairs = merge_rows(rows, np.arange(0, 2 * half, 2), self.rules, self.std_of)
            for key, value in d.items():
                value[:half] = pairs[key]
        odd = self.n_merged % 2
        if odd:
            for value in d.values():
                value[half] = value[self.n_merged - 1]
        self.n_merged, self._pending, self.span = half, odd, 2 * self.span

    def _make_room(self, n: int, like: Rows) -> None:
        """Room for n rows after the window: move the window back next to the merged and pending rows when
        it would run past the arrays' end, then grow the arrays if that is not enough."""
        kept, size = self.n_merged + self._pending, self._end - self._start
        capacity = 0 if self._data is None else len(self._data["steps"])
        if self._end + n > capacity and self._start > kept:
            for value in self._data.values():
                value[kept:kept + size] = value[self._start:self._end]  # numpy copies overlapping ranges safely
            self._start, self._end = kept, kept + size
        self._reserve(self._end + n, like)

    def _reserve(self, rows: int, like: Rows) -> None:
        """Arrays of at least `rows` rows (doubling, at most `max_rows`); every row keeps its position."""
        capacity = 0 if self._data is None else len(self._data["steps"])
        if rows <= capacity:
            return
        if rows > self.max_rows:
            raise RuntimeError(f"HistoryStore needs {rows} rows, more than max_rows={self.max_rows} (a bug)")
        capacity = min(max(rows, 2 * capacity, 64), self.max_rows)
        grown = {k: np.empty((capacity,) + v.shape[1:], dtype=v.dtype) for k, v in like.items()}
        if self._data is not None:
            for key, value in self._data.items():
                grown[key][:len(value)] = value
        self._data = grown

    def state_dict(self) -> dict:
        """The stored rows and the layout that says which are merged, for a checkpoint."""
        return {"span": self.span, "n_merged": self.n_merged, "pending": self._pending, "start": self._start,
                "end": self._end, "data": {k: v.copy() for k, v in self._data.items()} if self._data is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.span, self.n_merged, self._pending = state["span"], state["n_merged"], state["pending"]
        self._start, self._end = state["start"], state["end"]
        self._data = {k: np.array(v) for k, v in state["data"].items()} if state["data"] is not None else None

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the stored rows, oldest first: `steps`, `weights` and every field."""
        if self._data is None:
            return {}
        kept = self.n_merged + self._pending
        return {k: np.concatenate([v[:kept], v[self._start:self._end]]) for k, v in self._data.items()}
