"""Tumbling windows in event time: aggregates, closing by watermark + grace, late readings."""

from __future__ import annotations

import math
import statistics

import pytest

from sensormine.alerts.windows import Windows
from sensormine.reading import Reading

S = 1_000_000


def r(sec: float, v: float, metric: str = "t") -> Reading:
    return Reading("acme", "d1", metric, int(sec * S), v)


def test_a_window_closes_once_the_watermark_passes_its_end_plus_grace() -> None:
    w = Windows(width_s=60, grace_s=10)
    assert w.add([r(0, 1.0), r(20, 3.0), r(59, 5.0)]) == []
    assert w.add([r(69, 7.0)]) == []  # 69 - 10 < 60: still within the grace period
    assert w.add([r(30, 2.0)]) == []  # out of order but in grace: counted in the first window
    (closed,) = w.add([r(70, 8.0)])
    values = [1.0, 3.0, 5.0, 2.0]
    assert (closed.window_start_us, closed.count, closed.min, closed.max) == (0, 4, 1.0, 5.0)
    assert closed.avg == pytest.approx(statistics.mean(values))
    assert closed.stddev == pytest.approx(statistics.stdev(values))
    assert closed.rate_per_s == pytest.approx((5.0 - 1.0) / 59)  # first to last reading by time
    assert w.add([r(10, 100.0)]) == [] and w.late == 1  # beyond grace: dropped, counted
    (second,) = w.flush()
    assert (second.window_start_us, second.count, second.stddev, second.rate_per_s) == (
        60 * S,
        2,
        pytest.approx(math.sqrt(0.5)),
        1.0,
    )


def test_series_are_windowed_apart() -> None:
    w = Windows(width_s=10, grace_s=0)
    w.add([r(1, 1.0, "a"), r(2, 2.0, "b")])
    closed = w.add([r(10, 0.0, "a")])  # only a's watermark moved
    assert [(c.metric, c.count, c.stddev, c.rate_per_s) for c in closed] == [("a", 1, None, None)]
    assert [c.metric for c in w.flush()] == ["a", "b"]


def test_sliding_windows_hold_each_reading_once_per_window_they_overlap() -> None:
    w = Windows(width_s=60, grace_s=0, slide_s=20)
    early = w.add([r(5, 1.0), r(25, 2.0), r(45, 3.0)])  # [-40, 20) and [-20, 40) end before 45
    assert [(c.window_start_us // S, c.count, c.avg) for c in early] == [(-40, 1, 1.0), (-20, 2, 1.5)]
    closed = w.add([r(65, 4.0)])  # closes [0, 60) only: [20, 80) and [40, 100) are still open
    assert [(c.window_start_us // S, c.window_us // S, c.count, c.avg) for c in closed] == [(0, 60, 3, 2.0)]
    rest = w.flush()
    assert [(c.window_start_us // S, c.count, c.min, c.max) for c in rest] == [
        (20, 3, 2.0, 4.0),
        (40, 2, 3.0, 4.0),
        (60, 1, 4.0, 4.0),
    ]
    assert closed[0].id == "d1/t/0/60000000"
    with pytest.raises(ValueError, match="divide"):
        Windows(width_s=60, slide_s=25)


def test_a_reading_seen_again_is_not_counted_twice() -> None:
    w = Windows(width_s=10, grace_s=5, slide_s=5)
    w.add([r(1, 1.0), r(2, 2.0)])
    w.add([r(2, 2.0), r(1, 1.0)])  # a replayed batch
    assert w.duplicates == 2 and w.late == 0
    assert [(c.window_start_us // S, c.count) for c in w.flush()] == [(-5, 2), (0, 2)]


def test_a_replay_from_a_floor_opens_no_incomplete_window() -> None:
    w = Windows(width_s=10, grace_s=0)
    # The hot store replayed from 10 s: the window [0, 10) would miss what came before the floor.
    assert w.add([r(9, 1.0), r(12, 2.0), r(15, 3.0)], floor_us=10 * S, replay=True) == []
    assert w.late == 0
    w.add([r(8, 5.0)])  # live, older than the floor: late, not a window of one reading
    assert w.late == 1
    assert [(c.window_start_us // S, c.count) for c in w.flush()] == [(10, 2)]


def test_forgotten_series_emit_nothing() -> None:
    w = Windows(width_s=10, grace_s=0)
    w.add([r(1, 1.0, "a"), r(1, 1.0, "b")])
    assert w.forget(lambda series: series[2] == "a") == 1
    assert [c.metric for c in w.flush()] == ["b"]


def test_a_rebuilt_series_emits_what_the_restart_had_not_emitted_and_nothing_twice() -> None:
    readings = [r(t, float(t)) for t in range(0, 40, 2)]
    whole = Windows(width_s=10, grace_s=0)
    expected = {a.id: a for a in whole.add(readings)}
    before_crash = Windows(width_s=10, grace_s=0)
    emitted = before_crash.add(readings[:13])  # handled up to 24 s: [0, 10) and [10, 20) emitted
    assert [a.window_start_us // S for a in emitted] == [0, 10]
    rebuilt = Windows(width_s=10, grace_s=0)
    # The hot store held two readings more than had been handled (26 s and 28 s).
    assert rebuilt.add(readings[:15], floor_us=0, replay=True) == []
    emitted += rebuilt.add(readings[13:])  # Kafka redelivers from the first unhandled reading
    assert sorted(a.window_start_us // S for a in emitted) == [0, 10, 20, 30][: len(expected)]
    assert {a.id: a for a in emitted} == expected and len(emitted) == len(expected)
    assert rebuilt.duplicates == 2


def test_a_rebuilt_series_that_stays_silent_emits_only_its_open_window_at_the_end() -> None:
    w = Windows(width_s=10, grace_s=0)
    w.add([r(1, 1.0), r(12, 2.0), r(15, 3.0)], floor_us=0, replay=True)
    assert [(a.window_start_us // S, a.count) for a in w.flush()] == [(10, 2)]  # [0, 10) went out before
