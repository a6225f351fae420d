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
from dataclasses import dataclass

from sensormine.reading import Reading

Series = tuple[str, str, str]  # (tenant, device, metric)
_NEVER = -(2**62)
_FOREVER = 2**62


class _Acc:
    """One open window's running aggregate."""

    __slots__ = ("count", "first_ts", "first_v", "hi", "last_ts", "last_v", "lo", "m2", "mean", "seen", "total")

    def __init__(self, ts: int, v: float) -> None:
        self.count, self.total, self.m2, self.mean, self.lo, self.hi = 1, v, 0.0, v, v, v
        self.first_ts = self.last_ts = ts
        self.first_v = self.last_v = v
        self.seen = {ts}

    def add(self, ts: int, v: float) -> bool:
        """Fold one reading in; False when the window already holds a reading at `ts`."""
        seen = self.seen
        if ts in seen:
            return False
        seen.add(ts)
        self.count += 1
        self.total += v
        delta = v - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (v - self.mean)  # Welford
        if v < self.lo:
            self.lo = v
        elif v > self.hi:
            self.hi = v
        if ts < self.first_ts:
            self.first_ts, self.first_v = ts, v
        if ts >= self.last_ts:
            self.last_ts, self.last_v = ts, v
        return True


class _Series:
    """One series' open windows and watermarks."""

    __slots__ = ("closed_before", "due", "emitted_upto", "next_end", "rebuilt", "watermark", "windows")

    def __init__(self) -> None:
        self.windows: dict[int, _Acc] = {}
        self.watermark = _NEVER  # the newest event time taken
        self.closed_before = _NEVER  # windows starting before this are emitted (or before a replay's floor)
        self.next_end = _FOREVER  # the earliest end of an open window
        self.rebuilt = False  # replayed, no live reading yet
        self.emitted_upto = _NEVER  # windows ending by this were emitted before a restart
        self.due = False  # in this call's list of series to close

    def take(self, start: int, width: int, ts: int, v: float) -> bool:
        """Fold a reading into the window starting at `start` (opened if new); False for a duplicate."""
        acc = self.windows.get(start)
        if acc is not None:
            return acc.add(ts, v)
        self.windows[start] = _Acc(ts, v)
        if start + width < self.next_end:
            self.next_end = start + width
        return True


@dataclass(slots=True)
class WindowAggregate:
    """One closed window of one series; its fields, in order, are the aggregates-topic message body
    (`orjson.dumps` of it; the stream processor appends the device's type and labels)."""

    id: str  # "{device}/{metric}/{window_start_us}/{window_us}": the series and window, the message key
    tenant_id: str
    device_id: str
    metric: str
    window_start_us: int
    window_us: int
    count: int
    min: float
    max: float
    avg: float
    stddev: float | None  # None for a single reading
    rate_per_s: float | None  # (last - first) / seconds between them; None for a single instant


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
        self._series: dict[Series, _Series] = {}
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
        due: list[tuple[Series, _Series]] = []
        width, slide, grace = self.width_us, self.slide_us, self.grace_us
        tumbling = width == slide
        all_series = self._series
        for r in readings:
            key = (r.tenant_id, r.device_id, r.metric)
            st = all_series.get(key)
            if st is None:
                st = all_series[key] = _Series()
            ts = r.ts
            if replay:
                st.rebuilt = True
                if floor_us is not None and st.closed_before < floor_us:
                    st.closed_before = floor_us  # live readings too, from now on
            elif st.rebuilt:
                st.rebuilt = False
                self._handled_before(st, ts)
            last_start = ts - ts % slide
            if tumbling:
                taken = last_start >= st.closed_before and st.take(last_start, width, ts, r.value)
            else:
                taken = False
                for start in range(last_start, last_start - width, -slide):
                    if start < st.closed_before:
                        break
                    taken |= st.take(start, width, ts, r.value)
            if not taken:
                if last_start < st.closed_before:
                    if floor_us is None or last_start >= floor_us:
                        self.late += 1
                    continue
                self.duplicates += 1  # a replayed reading seen live: the windows it closes close now
            elif ts > st.watermark:
                st.watermark = ts
            if not replay and not st.due and st.watermark - grace >= st.next_end:
                st.due = True
                due.append((key, st))
        out: list[WindowAggregate] = []
        for key, st in due:
            st.due = False
            self._close(key, st, st.watermark - grace, out)
        return out

    def flush(self) -> list[WindowAggregate]:
        """Close every open window (the end of a finite stream)."""
        out: list[WindowAggregate] = []
        for key, st in list(self._series.items()):
            if st.rebuilt:  # replayed and never heard from since: every replayed reading was handled
                st.rebuilt = False
                self._handled_before(st, _FOREVER)
            self._close(key, st, _FOREVER, out)
        return out

    def _handled_before(self, st: _Series, ts: int) -> None:
        """`ts` is the series' first reading after a restart: the replayed readings before it were handled,
        and every window that the newest of them closed was emitted."""
        handled = max((t for acc in st.windows.values() for t in acc.seen if t < ts), default=None)
        if handled is not None:
            st.emitted_upto = handled - self.grace_us

    def forget(self, owned_elsewhere: Callable[[Series], bool]) -> int:
        """Drop, unemitted, the open windows of the series another process now owns (a partition
        revoked in a rebalance: its new owner rebuilds them); how many series were dropped."""
        gone = [key for key, st in self._series.items() if st.windows and owned_elsewhere(key)]
        for key in gone:
            del self._series[key]
        return len(gone)

    def _close(self, key: Series, st: _Series, upto_us: int, out: list[WindowAggregate]) -> None:
        windows, width = st.windows, self.width_us
        ends = sorted(start for start in windows if start + width <= upto_us)
        for start in ends:
            acc = windows.pop(start)
            if start + self.slide_us > st.closed_before:
                st.closed_before = start + self.slide_us
            if start + width <= st.emitted_upto:
                continue  # emitted before the restart
            span_s = (acc.last_ts - acc.first_ts) / 1_000_000
            n = acc.count
            out.append(
                WindowAggregate(
                    f"{key[1]}/{key[2]}/{start}/{width}",
                    key[0],
                    key[1],
                    key[2],
                    start,
                    width,
                    n,
                    acc.lo,
                    acc.hi,
                    acc.total / n,
                    math.sqrt(acc.m2 / (n - 1)) if n > 1 else None,
                    (acc.last_v - acc.first_v) / span_s if span_s > 0 else None,
                )
            )
        st.next_end = min(windows) + width if windows else _FOREVER
