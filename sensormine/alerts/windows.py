"""Tumbling windows per device x metric on the live stream, in event time, with a grace period.

A reading falls into the window [start, start + width) that contains its timestamp (aligned to the
Unix epoch, like the query API's buckets). A window closes when the series' newest event time
passes its end by `grace_us`; it is then emitted once with count, min, max, avg, stddev (sample)
and the rate of change per second between its first and last reading. A reading for a window that
has already closed is late beyond the grace period: it is counted (`late`) and dropped. No I/O here:
the stream processor publishes what `add` and `flush` return to `{env}.{tenant}.aggregates`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from sensormine.reading import Reading


@dataclass
class _Acc:
    count: int = 0
    total: float = 0.0
    m2: float = 0.0
    mean: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None

    def add(self, ts: int, v: float) -> None:
        self.count += 1
        self.total += v
        delta = v - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (v - self.mean)  # Welford
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)
        if self.first is None or ts < self.first[0]:
            self.first = (ts, v)
        if self.last is None or ts >= self.last[0]:
            self.last = (ts, v)


@dataclass(frozen=True)
class WindowAggregate:
    """One closed window of one series."""

    tenant_id: str
    device_id: str
    metric: str
    start_us: int
    width_us: int
    count: int
    min: float
    max: float
    avg: float
    stddev: float | None  # None for a single reading
    rate_per_s: float | None  # (last - first) / seconds between them; None for a single instant

    def as_json(self) -> dict[str, object]:
        """The aggregates-topic message body."""
        return {
            "tenant_id": self.tenant_id,
            "device_id": self.device_id,
            "metric": self.metric,
            "window_start_us": self.start_us,
            "window_us": self.width_us,
            "count": self.count,
            "min": self.min,
            "max": self.max,
            "avg": self.avg,
            "stddev": self.stddev,
            "rate_per_s": self.rate_per_s,
        }


class TumblingWindows:
    """Open windows of every series, closed by each series' own event-time watermark."""

    def __init__(self, width_s: float = 60.0, grace_s: float = 10.0) -> None:
        if width_s <= 0 or grace_s < 0:
            raise ValueError("window width must be > 0 and grace >= 0")
        self.width_us = int(width_s * 1_000_000)
        self.grace_us = int(grace_s * 1_000_000)
        self._open: dict[tuple[str, str, str], dict[int, _Acc]] = {}
        self._watermark: dict[tuple[str, str, str], int] = {}
        self._closed_before: dict[tuple[str, str, str], int] = {}  # series -> windows starting before this are emitted
        self.late = 0

    def add(self, readings: Iterable[Reading]) -> list[WindowAggregate]:
        """Take readings; the windows they closed."""
        touched: set[tuple[str, str, str]] = set()
        for r in readings:
            series = (r.tenant_id, r.device_id, r.metric)
            start = r.ts - r.ts % self.width_us
            if start < self._closed_before.get(series, -(2**62)):
                self.late += 1
                continue
            self._open.setdefault(series, {}).setdefault(start, _Acc()).add(r.ts, r.value)
            if r.ts > self._watermark.get(series, -(2**62)):
                self._watermark[series] = r.ts
            touched.add(series)
        out: list[WindowAggregate] = []
        for series in touched:
            out += self._close(series, self._watermark[series] - self.grace_us)
        return out

    def flush(self) -> list[WindowAggregate]:
        """Close every open window (at shutdown)."""
        out: list[WindowAggregate] = []
        for series in list(self._open):
            out += self._close(series, 2**62)
        return out

    def _close(self, series: tuple[str, str, str], upto_us: int) -> list[WindowAggregate]:
        windows = self._open.get(series, {})
        out = []
        for start in sorted(s for s in windows if s + self.width_us <= upto_us):
            acc = windows.pop(start)
            self._closed_before[series] = max(self._closed_before.get(series, -(2**62)), start + self.width_us)
            assert acc.first is not None and acc.last is not None
            span_s = (acc.last[0] - acc.first[0]) / 1_000_000
            out.append(
                WindowAggregate(
                    *series,
                    start_us=start,
                    width_us=self.width_us,
                    count=acc.count,
                    min=acc.lo,
                    max=acc.hi,
                    avg=acc.total / acc.count,
                    stddev=math.sqrt(acc.m2 / (acc.count - 1)) if acc.count > 1 else None,
                    rate_per_s=(acc.last[1] - acc.first[1]) / span_s if span_s > 0 else None,
                )
            )
        if not windows:
            self._open.pop(series, None)
        return out
