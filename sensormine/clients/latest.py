"""The newest point of every series, pushed from the hot-store writers to the API processes.

Every hot-store write transaction ends with `pg_notify('sensormine_latest', …)` carrying the newest
reading of each series it wrote (`notify_latest`). PostgreSQL delivers a notification only when its
transaction commits, so an API process never sees a point that did not land. Each API process runs a
`LatestListener` that LISTENs and folds those points into a `LatestCache`; `GET /api/query/latest`
then answers from memory. A device's entry is first filled from the database (the planner's query);
after that, notifications keep it current. Per series the newer timestamp always wins, so a fill and
a notification can arrive in any order. When the listening connection drops, notifications may have
been missed: the cache is emptied and refilled from the database on demand.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "sensormine_latest"
MAX_PAYLOAD = 7800  # PostgreSQL's limit is 8000 bytes per notification

Point = tuple[int, float, int]  # ts (µs since the Unix epoch), value, quality
SeriesPoint = tuple[str, str, str, int, float, int]  # tenant, device, metric, ts, value, quality


def newest_per_series(points: Iterable[SeriesPoint]) -> list[SeriesPoint]:
    """The newest point of each (tenant, device, metric) among `points`."""
    best: dict[tuple[str, str, str], SeriesPoint] = {}
    for p in points:
        key = (p[0], p[1], p[2])
        have = best.get(key)
        if have is None or p[3] > have[3]:
            best[key] = p
    return list(best.values())


def payloads(points: Sequence[SeriesPoint]) -> list[str]:
    """The points as JSON notification payloads, each under PostgreSQL's size limit."""
    out: list[str] = []
    chunk: list[str] = []
    size = 2
    for p in points:
        item = json.dumps(p, separators=(",", ":"))
        if chunk and size + len(item) + 1 > MAX_PAYLOAD:
            out.append("[" + ",".join(chunk) + "]")
            chunk, size = [], 2
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        out.append("[" + ",".join(chunk) + "]")
    return out


def notify_latest(conn: psycopg.Connection, points: Sequence[SeriesPoint]) -> None:
    """Queue the newest points for delivery at commit (call inside the write transaction)."""
    if points:
        conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, payloads(points)))


@dataclass
class _Entry:
    series: dict[str, Point] = field(default_factory=dict)
    filled: bool = False  # holds every series of the device (filled from the database since the last reset)


class LatestCache:
    """Newest point per series, by (tenant, device); thread-safe."""

    def __init__(self, max_devices: int = 100_000) -> None:
        self.max_devices = max_devices
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.generation = 0  # bumped by every reset: fills begun before it are discarded
        self.listening = False  # only while notifications flow may filled entries be served

    def get(self, tenant_id: str, device_id: str) -> dict[str, Point] | None:
        """All series of a device, or None unless its entry is filled and the listener is live."""
        if not self.listening:
            return None
        entry = self._entries.get((tenant_id, device_id))
        if entry is None or not entry.filled:
            return None
        return entry.series

    def apply(self, points: Iterable[SeriesPoint]) -> None:
        """Fold pushed points in (newer timestamps win; unfilled devices keep them for their fill)."""
        with self._lock:
            for tenant_id, device_id, metric, ts, value, quality in points:
                key = (tenant_id, device_id)
                entry = self._entries.get(key)
                if entry is None:
                    continue  # nobody asked for this device yet: its fill will read the database
                have = entry.series.get(metric)
                if have is None or ts > have[0]:
                    entry.series = {**entry.series, metric: (ts, value, quality)}

    def begin_fill(self, tenant_id: str, device_id: str) -> int:
        """Start tracking a device before reading it from the database; returns the generation to pass on."""
        with self._lock:
            if len(self._entries) >= self.max_devices:
                self._entries.clear()
            self._entries.setdefault((tenant_id, device_id), _Entry())
            return self.generation

    def fill(self, tenant_id: str, device_id: str, series: dict[str, Point], generation: int) -> None:
        """Merge a device's series read from the database (begun at `generation`) and mark it filled."""
        with self._lock:
            if generation != self.generation:
                return  # the listener reconnected meanwhile: this read may predate missed notifications
            entry = self._entries.setdefault((tenant_id, device_id), _Entry())
            merged = dict(series)
            for metric, point in entry.series.items():
                if metric not in merged or point[0] > merged[metric][0]:
                    merged[metric] = point
            entry.series = merged
            entry.filled = True

    def reset(self) -> None:
        """Forget everything (notifications may have been missed)."""
        with self._lock:
            self._entries.clear()
            self.generation += 1

    def forget(self, tenant_id: str, device_id: str) -> None:
        """Drop one device (deleted, or its data rewritten)."""
        with self._lock:
            self._entries.pop((tenant_id, device_id), None)


class LatestListener:
    """A thread that LISTENs on the channel and feeds a LatestCache; reconnects with backoff."""

    def __init__(self, connect: Callable[[], psycopg.Connection], cache: LatestCache) -> None:
        self.connect = connect
        self.cache = cache
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latest-listener", daemon=True)
        self.connected = threading.Event()

    def start(self, wait_s: float = 5.0) -> None:
        """Start listening (waits up to `wait_s` for the first LISTEN to be in place)."""
        self._thread.start()
        self.connected.wait(wait_s)

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.cache.listening = False

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with self.connect() as conn:
                    conn.autocommit = True
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.cache.reset()  # whatever came before this LISTEN may have been missed
                    self.cache.listening = True
                    self.connected.set()
                    backoff = 0.5
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=1000):
                            self.cache.apply(tuple(p) for p in json.loads(note.payload))
            except (psycopg.Error, OSError, ValueError) as exc:
                self.cache.listening = False
                if self._stop.is_set():
                    return
                log.warning("latest-value listener lost its connection (%s); retrying in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                self.cache.listening = False


def wait_until_listening(cache: LatestCache, timeout_s: float = 5.0) -> bool:
    """Whether the cache's listener is live within `timeout_s` (for tests and start-up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cache.listening:
            return True
        time.sleep(0.01)
    return cache.listening
