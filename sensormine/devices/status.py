"""Device status: when each device was last heard from, and how many messages, readings and errors.

Every ingest path (MQTT, OPC UA, Modbus daemons, HTTP ingest) counts what it sees in a
`StatusTracker` (in memory, thread-safe, cheap per message) and flushes the tallies every few
seconds as one additive upsert into `device_status`, so several daemons can count the same
device. Online means heard from within `Settings.device_offline_after_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from sensormine.ingest.sinks import Done, ReadingSink
from sensormine.reading import Reading
from sensormine.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Tally:
    last_seen: datetime
    source: str
    messages: int = 0
    readings: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None


@dataclass(frozen=True)
class DeviceStatus:
    """One device's status as the API shows it."""

    tenant_id: str
    device_id: str
    last_seen: datetime | None
    last_source: str | None
    online: bool
    messages: int
    readings: int
    errors: int
    last_error: str | None
    last_error_at: datetime | None


class StatusTracker:
    """Counts messages per device in memory; `flush` writes them (call it every few seconds)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._lock = threading.Lock()

    def _tally(self, tenant_id: str, device_id: str, now: datetime, source: str | None) -> _Tally:
        tally = self._tallies.get((tenant_id, device_id))
        if tally is None:
            tally = self._tallies[(tenant_id, device_id)] = _Tally(now, source or self.source)
        tally.last_seen = now
        tally.source = source or tally.source
        return tally

    def seen(self, tenant_id: str, device_id: str, readings: int, source: str | None = None) -> None:
        """A message with `readings` readings arrived from the device (through `source`, e.g. mqtt)."""
        now = datetime.now(UTC)
        with self._lock:
            tally = self._tally(tenant_id, device_id, now, source)
            tally.messages += 1
            tally.readings += readings

    def error(self, tenant_id: str, device_id: str, reason: str, source: str | None = None) -> None:
        """A message from the device was rejected (or a poll of it failed) for `reason`."""
        now = datetime.now(UTC)
        with self._lock:
            tally = self._tally(tenant_id, device_id, now, source)
            tally.messages += 1
            tally.errors += 1
            tally.last_error, tally.last_error_at = reason[:500], now

    def flush(self, conn: psycopg.Connection) -> int:
        """Add the tallies to `device_status` in one transaction; returns devices written.

        Devices no longer in the registry are skipped (their messages were dead-lettered anyway).
        On failure the tallies are kept for the next flush.
        """
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        if not tallies:
            return 0
        rows = [
            (t, d, x.last_seen, x.source, x.messages, x.readings, x.errors, x.last_error, x.last_error_at)
            for (t, d), x in sorted(tallies.items())
        ]
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO device_status AS s (tenant_id, device_id, last_seen, last_source, messages, "
                    "readings, errors, last_error, last_error_at) "
                    "SELECT v.* FROM (VALUES (%s, %s, %s::timestamptz, %s, %s::bigint, %s::bigint, %s::bigint, "
                    "%s, %s::timestamptz)) AS v(t, d, ls, src, m, r, e, le, lea) "
                    "WHERE EXISTS (SELECT 1 FROM devices WHERE tenant_id = v.t AND id = v.d) "
                    "ON CONFLICT (tenant_id, device_id) DO UPDATE SET "
                    "last_seen = greatest(s.last_seen, excluded.last_seen), "
                    "last_source = CASE WHEN excluded.last_seen >= s.last_seen THEN excluded.last_source "
                    "ELSE s.last_source END, "
                    "messages = s.messages + excluded.messages, readings = s.readings + excluded.readings, "
                    "errors = s.errors + excluded.errors, "
                    "last_error = coalesce(excluded.last_error, s.last_error), "
                    "last_error_at = coalesce(excluded.last_error_at, s.last_error_at)",
                    rows,
                )
        except psycopg.Error:
            with self._lock:
                for key, tally in tallies.items():
                    self._merge_back(key, tally)
            raise
        return len(rows)

    def _merge_back(self, key: tuple[str, str], old: _Tally) -> None:
        new = self._tallies.get(key)
        if new is None:
            self._tallies[key] = old
            return
        new.messages += old.messages
        new.readings += old.readings
        new.errors += old.errors
        if new.last_error is None:
            new.last_error, new.last_error_at = old.last_error, old.last_error_at


class StatusFlusher:
    """Flushes a tracker every `interval_s` on a daemon thread, and once more on `stop`."""

    def __init__(
        self, tracker: StatusTracker, connect: Callable[[], psycopg.Connection], interval_s: float = 5.0
    ) -> None:
        self.tracker = tracker
        self._connect = connect
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="device-status", daemon=True)
        self._conn: psycopg.Connection | None = None

    def start(self) -> StatusFlusher:
        self._thread.start()
        return self

    def flush(self) -> None:
        """Write the tallies now (reconnecting if needed); failures are logged and retried later."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            self.tracker.flush(self._conn)
        except psycopg.Error as exc:
            log.warning("device status not written (kept for the next flush): %s", exc)
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()

    def stop(self) -> None:
        """Stop the thread and flush what is left."""
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5)
        self.flush()
        if self._conn is not None:
            self._conn.close()


def device_statuses(
    conn: psycopg.Connection, tenant_ids: list[str], offline_after_s: float, device_ids: list[str] | None = None
) -> list[DeviceStatus]:
    """Status of every registered device of the tenants (never heard from: no last_seen, offline)."""
    rows = conn.execute(
        "SELECT d.tenant_id, d.id, s.last_seen, s.last_source, coalesce(s.messages, 0), coalesce(s.readings, 0), "
        "coalesce(s.errors, 0), s.last_error, s.last_error_at, now() "
        "FROM devices d LEFT JOIN device_status s ON s.tenant_id = d.tenant_id AND s.device_id = d.id "
        "WHERE d.tenant_id = ANY(%s) AND (%s::text[] IS NULL OR d.id = ANY(%s)) ORDER BY d.tenant_id, d.id",
        (tenant_ids, device_ids, device_ids),
    ).fetchall()
    cutoff = timedelta(seconds=offline_after_s)
    return [
        DeviceStatus(t, d, seen, src, seen is not None and now - seen <= cutoff, m, r, e, le, lea)
        for t, d, seen, src, m, r, e, le, lea, now in rows
    ]


class TrackingSink:
    """A ReadingSink that counts what passes through it per device (for `device_status`), then hands it on.

    Wrap a daemon's sink with it: every publish counts as one message from the device, every
    reject naming a device as one error. The tallies are written every few seconds, and on
    `close` (daemons close the sinks they own when they stop), so nothing counted is lost at a
    clean shutdown. `flush` stays free of database work: HTTP ingest flushes once per request.
    """

    def __init__(self, inner: ReadingSink, connect: Callable[[], psycopg.Connection], interval_s: float = 5.0) -> None:
        self.inner = inner
        self.tracker = StatusTracker("ingest")
        self.flusher = StatusFlusher(self.tracker, connect, interval_s).start()

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        """Count, then hand the readings on."""
        self.tracker.seen(tenant_id, device_id, len(readings), source)
        self.inner.publish(tenant_id, device_id, source, readings, done)

    def reject(
        self,
        source: str,
        origin: str,
        reason: str,
        payload: bytes,
        tenant_id: str | None = None,
        device_id: str | None = None,
        done: Done | None = None,
    ) -> None:
        """Count an error for a known device, then hand the dead letter on."""
        if tenant_id and device_id:
            self.tracker.error(tenant_id, device_id, reason, source)
        self.inner.reject(source, origin, reason, payload, tenant_id, device_id, done)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve the inner sink's callbacks."""
        self.inner.poll(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        """Flush the inner sink (the tallies are written by the flusher thread, and on `close`)."""
        return self.inner.flush(timeout)

    def close(self) -> None:
        """Stop the status thread (writing what is left) and close the inner sink."""
        self.flusher.stop()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def tracked(inner: ReadingSink, settings: Settings) -> TrackingSink:
    """`inner` wrapped in a TrackingSink writing to the settings' database."""
    from sensormine.clients.postgres import INGEST, connect

    return TrackingSink(inner, lambda: connect(settings, role=INGEST))
