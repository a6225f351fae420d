"""Tumbling and sliding windows per device x metric on the live stream, in event time, with a grace period.

Windows are `width` long and start every `slide` (tumbling when slide == width, the default;
sliding, also called hopping, when slide divides width: a reading then falls into width / slide
windows). Starts are aligned to the Unix epoch, like the query API's buckets. A window closes when
its series' newest event time passes its end by `grace_us`; it is then emitted once with count,
min, max, avg, stddev (sample) and the rate of change per second between its first and last
reading. A reading for a window that has already closed is late beyond the grace period: it is
counted (`late`) and dropped. A reading whose timestamp a window already holds is the same reading
again (the hot store keeps one row per device, metric and time, too): it is counted (`duplicates`)
and changes nothing, so a batch replayed after a crash, or the hot store replayed on start, never
counts a reading twice. An aggregate's `id` names its series and window.

After a restart the windows are rebuilt from a replay of the hot store (`add(..., replay=True)`):
the replay only fills windows, it closes none. The first live reading of a rebuilt series then
tells which windows were emitted before the restart: those that a reading before it (the replayed
readings older than it, already handled) had closed. They are closed without being emitted again;
the rest close as usual. So a restart neither loses nor repeats a window, provided the replay held
every reading handled before it (the stream processor waits for the hot store to catch up).

No I/O here: the stream processor publishes what `add` and `flush` return to
`{env}.{tenant}.aggregates`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sensormine.reading import Reading

Series = tuple[str, str, str]  # (tenant, device, metric)
_NEVER = -(2**62)


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
    seen: set[int] = field(default_factory=set)

    def add(self, ts: int, v: float) -> bool:
        """Fold one reading in; False when the window already holds a reading at `ts`."""
        if ts in self.seen:
            return False
        self.seen.add(ts)
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
        return True


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

    @property
    def id(self) -> str:
        """The series and window; the aggregates topic's message key."""
        return f"{self.device_id}/{self.metric}/{self.start_us}/{self.width_us}"

    def as_json(self) -> dict[str, object]:
        """The aggregates-topic message body (the stream processor adds the device's type and labels)."""
        return {
            "id": self.id,
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


class Windows:
    """Open windows of every series, closed by each series' own event-time watermark."""

    def __init__(self, width_s: float = 60.0, grace_s: float = 10.0, slide_s: float | None = None) -> None:
        if width_s <= 0 or grace_s < 0:
            raise ValueError("window width must be > 0 and grace >= 0")
        self.width_us = int(width_s * 1_000_000)
        self.slide_us = self.width_us if slide_s is None else int(slide_s * 1_000_000)
        if self.slide_us <= 0 or self.width_us % self.slide_us:
            raise ValueError("the slide must be > 0 and divide the window width")
        self.grace_us = int(grace_s * 1_000_000)
        self._open: dict[Series, dict[int, _Acc]] = {}
        self._watermark: dict[Series, int] = {}
        self._closed_before: dict[Series, int] = {}  # series -> windows starting before this are emitted
        self._rebuilt: set[Series] = set()  # replayed, no live reading yet
        self._emitted_upto: dict[Series, int] = {}  # series -> windows ending by this were emitted before a restart
        self.late = 0
        self.duplicates = 0

    def add(
        self, readings: Iterable[Reading], floor_us: int | None = None, replay: bool = False
    ) -> list[WindowAggregate]:
        """Take readings; the windows they closed.

        `replay`: readings of the hot store, handled before a restart, replayed from `floor_us` (a
        window boundary): windows starting before the floor would be incomplete, so they are neither
        opened nor counted as late, and no window is closed (see the module's docstring).
        """
        touched: set[Series] = set()
        width, slide = self.width_us, self.slide_us
        for r in readings:
            series = (r.tenant_id, r.device_id, r.metric)
            if replay:
                self._rebuilt.add(series)
            elif series in self._rebuilt:
                self._rebuilt.discard(series)
                self._handled_before(series, r.ts)
            closed_before = self._closed_before.get(series, _NEVER)
            if floor_us is not None and closed_before < floor_us:
                closed_before = self._closed_before[series] = floor_us  # live readings too, from now on
            last_start = r.ts - r.ts % slide
            windows = self._open.get(series)
            taken = False
            for start in range(last_start, last_start - width, -slide):
                if start < closed_before:
                    break
                if windows is None:
                    windows = self._open[series] = {}
                acc = windows.get(start)
                if acc is None:
                    acc = windows[start] = _Acc()
                taken |= acc.add(r.ts, r.value)
            if not taken:
                if last_start < closed_before:
                    if floor_us is None or last_start >= floor_us:
                        self.late += 1
                else:
                    self.duplicates += 1
                    if not replay:
                        touched.add(series)  # a replayed reading seen live: the windows it closes close now
                continue
            if r.ts > self._watermark.get(series, _NEVER):
                self._watermark[series] = r.ts
            if not replay:
                touched.add(series)
        out: list[WindowAggregate] = []
        for series in touched:
            out += self._close(series, self._watermark[series] - self.grace_us)
        return out

    def flush(self) -> list[WindowAggregate]:
        """Close every open window (the end of a finite stream)."""
        out: list[WindowAggregate] = []
        for series in list(self._open):
            if series in self._rebuilt:  # replayed and never heard from since: every replayed reading was handled
                self._rebuilt.discard(series)
                self._handled_before(series, 2**62)
            out += self._close(series, 2**62)
        return out

    def _handled_before(self, series: Series, ts: int) -> None:
        """`ts` is the series' first reading after a restart: the replayed readings before it were handled,
        and every window that the newest of them closed was emitted."""
        handled = max((t for acc in self._open.get(series, {}).values() for t in acc.seen if t < ts), default=None)
        if handled is not None:
            self._emitted_upto[series] = handled - self.grace_us

    def forget(self, owned_elsewhere: Callable[[Series], bool]) -> int:
        """Drop, unemitted, the open windows of the series another process now owns (a partition
        revoked in a rebalance: its new owner rebuilds them); how many series were dropped."""
        gone = [s for s in self._open if owned_elsewhere(s)]
        for series in gone:
            del self._open[series]
            self._watermark.pop(series, None)
            self._closed_before.pop(series, None)
            self._rebuilt.discard(series)
            self._emitted_upto.pop(series, None)
        return len(gone)

    def _close(self, series: Series, upto_us: int) -> list[WindowAggregate]:
        windows = self._open.get(series, {})
        emitted_upto = self._emitted_upto.get(series, _NEVER)
        out = []
        for start in sorted(s for s in windows if s + self.width_us <= upto_us):
            acc = windows.pop(start)
            self._closed_before[series] = max(self._closed_before.get(series, _NEVER), start + self.slide_us)
            if start + self.width_us <= emitted_upto:
                continue  # emitted before the restart
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
