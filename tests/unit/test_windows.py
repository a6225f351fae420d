"""Tumbling windows in event time: aggregates, closing by watermark + grace, late readings."""

from __future__ import annotations

import math
import statistics

import pytest

from sensormine.alerts.windows import TumblingWindows
from sensormine.reading import Reading

S = 1_000_000


def r(sec: float, v: float, metric: str = "t") -> Reading:
    return Reading("acme", "d1", metric, int(sec * S), v)


def test_a_window_closes_once_the_watermark_passes_its_end_plus_grace() -> None:
    w = TumblingWindows(width_s=60, grace_s=10)
    assert w.add([r(0, 1.0), r(20, 3.0), r(59, 5.0)]) == []
    assert w.add([r(69, 7.0)]) == []  # 69 - 10 < 60: still within the grace period
    assert w.add([r(30, 2.0)]) == []  # out of order but in grace: counted in the first window
    (closed,) = w.add([r(70, 8.0)])
    values = [1.0, 3.0, 5.0, 2.0]
    assert (closed.start_us, closed.count, closed.min, closed.max) == (0, 4, 1.0, 5.0)
    assert closed.avg == pytest.approx(statistics.mean(values))
    assert closed.stddev == pytest.approx(statistics.stdev(values))
    assert closed.rate_per_s == pytest.approx((5.0 - 1.0) / 59)  # first to last reading by time
    assert w.add([r(10, 100.0)]) == [] and w.late == 1  # beyond grace: dropped, counted
    (second,) = w.flush()
    assert (second.start_us, second.count, second.stddev, second.rate_per_s) == (
        60 * S,
        2,
        pytest.approx(math.sqrt(0.5)),
        1.0,
    )


def test_series_are_windowed_apart() -> None:
    w = TumblingWindows(width_s=10, grace_s=0)
    w.add([r(1, 1.0, "a"), r(2, 2.0, "b")])
    closed = w.add([r(10, 0.0, "a")])  # only a's watermark moved
    assert [(c.metric, c.count, c.stddev, c.rate_per_s) for c in closed] == [("a", 1, None, None)]
    assert [c.metric for c in w.flush()] == ["a", "b"]
