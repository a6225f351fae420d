"""Anomaly features of a (device, metric) series: one definition for the batch and the stream.

For each reading, against the `WINDOW` readings of the same series just before it (the reading
itself excluded, so a spike does not widen its own yardstick):

* `rolling_mean`  mean of the window (the value itself when the window is empty);
* `rolling_std`   population standard deviation of the window (0 with fewer than two values);
* `zscore`        (value - rolling_mean) / rolling_std, clipped to +-`ZSCORE_CLIP`, 0 when the std is 0;
* `rate_per_s`    (value - previous value) / seconds since the previous reading, 0 for the first.

Both paths call `window_features` on a matrix of windows (row i: the previous values of reading
i, most recent first, zero past its count). Its sums run column by column in one fixed order, so
a window gives bit-identical features whether it is one row of a million (batch) or the only row
(stream). Windows are counted in readings, not seconds, and follow the series' time order: the
batch sorts a day by (device, metric, ts); the stream takes readings as they arrive, so a
late reading (older than the series' last) is not re-sorted (its rate is 0, see `SeriesState`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

WINDOW = 30
"""Readings of the same series in each window."""

ZSCORE_CLIP = 100.0
"""|zscore| cap: a window of identical values has std 0 and would make any change infinite."""

FEATURES: tuple[str, ...] = ("rolling_mean", "rolling_std", "zscore", "rate_per_s")
"""Feature columns, in the order of the matrices `window_features` returns."""

_BATCH_ROWS = 65_536  # rows per window matrix in the batch path: ~16 MB of float64 at WINDOW = 30


def window_features(values: np.ndarray, windows: np.ndarray, counts: np.ndarray, dt_s: np.ndarray) -> np.ndarray:
    """Features (n x len(FEATURES), float64) of n readings from their windows.

    `values` (n,) the readings; `windows` (n, WINDOW) the previous values, most recent first,
    0.0 beyond `counts` (n,) valid ones; `dt_s` (n,) seconds since the previous reading (any
    value when the count is 0). The one definition both paths use.
    """
    n = values.shape[0]
    valid = np.maximum(counts, 1).astype(np.float64)
    total = np.zeros(n)
    for j in range(WINDOW):  # one fixed order of additions, whatever n is
        total = total + windows[:, j]
    mean = np.where(counts > 0, total / valid, values)
    squares = np.zeros(n)
    for j in range(WINDOW):
        d = windows[:, j] - mean
        squares = squares + np.where(j < counts, d * d, 0.0)
    std = np.where(counts > 1, np.sqrt(squares / valid), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, (values - mean) / std, 0.0)
        rate = np.where((counts > 0) & (dt_s > 0), (values - windows[:, 0]) / dt_s, 0.0)
    z = np.clip(z, -ZSCORE_CLIP, ZSCORE_CLIP)
    return np.stack([mean, std, z, rate], axis=1)


def series_starts(keys: Sequence[np.ndarray]) -> np.ndarray:
    """For each row of key-sorted columns, the index of the first row of its series."""
    n = len(keys[0]) if keys else 0
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    return starts[np.cumsum(change) - 1]


def batch_features(values: np.ndarray, ts_us: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Features of rows sorted by series then time; `starts[i]` is the first row of row i's series."""
    n = values.shape[0]
    out = np.empty((n, len(FEATURES)))
    positions = np.arange(n)
    for lo in range(0, n, _BATCH_ROWS):
        hi = min(n, lo + _BATCH_ROWS)
        rows = positions[lo:hi]
        counts = np.minimum(rows - starts[lo:hi], WINDOW)
        windows = np.zeros((hi - lo, WINDOW))
        for j in range(WINDOW):
            back = rows - (j + 1)
            windows[:, j] = np.where(j < counts, values[np.maximum(back, 0)], 0.0)
        prev_ts = ts_us[np.maximum(rows - 1, 0)]
        dt_s = (ts_us[lo:hi] - prev_ts) / 1e6
        out[lo:hi] = window_features(values[lo:hi], windows, counts, dt_s)
    return out


def table_features(readings: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """Readings (READING_SCHEMA columns) sorted by tenant, device, metric and ts, and their features."""
    ordered = readings.sort_by([(c, "ascending") for c in ("tenant_id", "device_id", "metric", "ts")])
    if ordered.num_rows == 0:
        return ordered, np.zeros((0, len(FEATURES)))
    keys = [
        pc.cast(ordered[c], pa.large_string()).to_numpy(zero_copy_only=False)
        for c in ("tenant_id", "device_id", "metric")
    ]
    ts_us = ordered["ts"].cast(pa.int64()).to_numpy()
    values = ordered["value"].to_numpy().astype(np.float64)
    return ordered, batch_features(values, ts_us, series_starts(keys))


class SeriesState:
    """The incremental state of one series: its last `WINDOW` values (most recent first) and last time."""

    __slots__ = ("last_ts_us", "values")

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=WINDOW)
        self.last_ts_us: int | None = None

    def window(self) -> tuple[np.ndarray, int]:
        """The window row `window_features` expects, and its count."""
        row = np.zeros(WINDOW)
        count = len(self.values)
        if count:
            row[:count] = self.values
        return row, count

    def dt_s(self, ts_us: int) -> float:
        """Seconds since the last reading (0 for the first: no rate)."""
        return 0.0 if self.last_ts_us is None else (ts_us - self.last_ts_us) / 1e6

    def push(self, ts_us: int, value: float) -> None:
        """Take a reading into the window (after its features are computed)."""
        self.values.appendleft(value)
        # A late reading joins the window but does not move the clock back.
        self.last_ts_us = ts_us if self.last_ts_us is None else max(self.last_ts_us, ts_us)


def stream_features(states: Sequence[SeriesState], ts_us: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """Features of one reading for each of several distinct series, advancing their states."""
    n = len(states)
    windows = np.zeros((n, WINDOW))
    counts = np.zeros(n, dtype=np.int64)
    dt = np.zeros(n)
    for i, state in enumerate(states):
        windows[i], counts[i] = state.window()
        dt[i] = state.dt_s(ts_us[i])
    out = window_features(np.asarray(values, dtype=np.float64), windows, counts, dt)
    for i, state in enumerate(states):
        state.push(ts_us[i], float(values[i]))
    return out
