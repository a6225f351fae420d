"""Store-and-forward: a bounded SQLite buffer in front of a ReadingSink, for when its link is down.

`BufferedSink` wraps the sink a daemon writes to (Kafka, or the in-process hot-store path) and is a
`ReadingSink` itself. While the inner sink delivers, every message passes straight through and the
caller's `done` fires on the inner's confirmation; the disk is not touched. When a delivery fails
(the inner reports it, raises a link error, or stays silent past a backstop timeout), the sink
switches to storing: that message and every later one are appended to a SQLite database (WAL mode,
synchronous=FULL, group commit) and `done` fires once they are committed there, so the daemon can
acknowledge its source. A worker thread drains the database in arrival order through the inner
sink, deleting rows only once the inner confirms them. Once every buffered row has been handed to
the inner and confirmed batches show the link works, what still waits for the disk is handed to the
inner right behind them and the sink is back to pass-through. Nothing newer overtakes buffered data:
while anything is buffered, new data is buffered (or handed over) behind it. See
docs/store-and-forward.md for the decisions and their limits.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import psycopg
from confluent_kafka import KafkaError, KafkaException, Message

from sensormine.ingest.sinks import DirectSink, Done, KafkaSink, ReadingSink
from sensormine.reading import Reading, now_us
from sensormine.settings import Settings, get_settings
from sensormine.telemetry.payload import decode_envelope, encode_envelope

log = logging.getLogger("sensormine.ingest.buffer")

DropPolicy = Literal["oldest", "newest"]

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of buffered messages
DEFAULT_LINK_TIMEOUT_S = 5.0  # how long Kafka may fail to confirm a message before it is buffered
DEFAULT_DELIVERY_TIMEOUT_S = 60.0  # backstop for inner sinks that never report a failure
ROW_OVERHEAD = 64  # bytes counted per buffered message on top of its body and names
SCHEMA_VERSION = 1

_READINGS = 0
_REJECT = 1

LINK_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    BufferError,
    KafkaException,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
"""Exceptions from an inner sink that mean "the link is down, try again later" (anything else is a bug
or a bad message, and is not buffered)."""


class BufferInUse(RuntimeError):
    """Another process holds the buffer file (two daemons must never drain the same buffer)."""


@dataclass
class BufferStats:
    """Counters since the sink was opened (messages, and the readings they carry)."""

    passed: int = 0  # delivered by the inner sink straight away
    buffered: int = 0  # written to the disk buffer
    buffered_readings: int = 0
    drained: int = 0  # forwarded from the disk buffer and confirmed by the inner sink
    drained_readings: int = 0
    dropped: int = 0  # discarded because the buffer was full (or a row could not be forwarded at all)
    dropped_readings: int = 0
    dead_lettered: int = 0  # buffered messages the inner refused for a non-link reason, sent to the DLQ
    out_of_order: int = 0  # a message of a device reached the inner before an older buffered one
    late: int = 0  # confirmed after being given up on (it was buffered too, so it may arrive twice)
    outages: int = 0  # switches from pass-through to buffering


class _Item:
    """One message handed to the sink; passed to the inner sink as its `done` (a delivery ticket).

    The inner calls it when the message is durable there, or `failed(reason)` when it definitely is not.
    """

    __slots__ = (
        "deadline",
        "device_id",
        "done",
        "kind",
        "origin",
        "payload",
        "readings",
        "reason",
        "seq",
        "sink",
        "source",
        "tenant_id",
    )

    def __init__(
        self,
        sink: BufferedSink,
        kind: int,
        tenant_id: str | None,
        device_id: str | None,
        source: str,
        readings: list[Reading],
        origin: str,
        reason: str,
        payload: bytes,
        done: Done | None,
    ) -> None:
        self.sink = sink
        self.kind = kind
        self.tenant_id = tenant_id
        self.device_id = device_id
        self.source = source
        self.readings = readings
        self.origin = origin
        self.reason = reason
        self.payload = payload
        self.done = done
        self.seq = 0
        self.deadline = 0.0

    def __call__(self) -> None:
        self.sink._delivered(self)

    def failed(self, reason: str) -> None:
        """The inner sink gave up on this message (it will never be delivered by that attempt)."""
        self.sink._failed(self, reason)

    @property
    def n_readings(self) -> int:
        """Readings carried (0 for a dead letter)."""
        return len(self.readings)


class _Row(NamedTuple):
    """One buffered message as stored on disk."""

    seq: int
    kind: int
    tenant_id: str | None
    device_id: str | None
    source: str
    origin: str | None
    reason: str | None
    readings: int
    size: int
    body: bytes


class _Batch:
    """Rows forwarded from disk and not yet all confirmed or failed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.rows: dict[int, _Row] = {}
        self.pending = 0
        self.confirmed: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self.discarded: set[int] = set()  # resolved by dropping, not by delivery
        self.finished = False

    @property
    def hi(self) -> int:
        """Highest seq sent in this batch (rows up to it must not be dropped while in flight)."""
        return max(self.rows, default=0)


class _Forwarded:
    """Delivery ticket of one row forwarded from disk."""

    __slots__ = ("batch", "seq", "sink")

    def __init__(self, sink: BufferedSink, batch: _Batch, seq: int) -> None:
        self.sink = sink
        self.batch = batch
        self.seq = seq

    def __call__(self) -> None:
        self.sink._forward_resolved(self, None)

    def failed(self, reason: str) -> None:
        """The inner sink gave up on this row; it stays on disk for the next attempt."""
        self.sink._forward_resolved(self, reason)


# One open BufferedSink per buffer file and process: opening the file again (a daemon restarted in
# the same process) closes the earlier sink first, as an MQTT broker ends an older session of the
# same client id. Other processes are kept out by an flock.
_OPEN: dict[str, weakref.ref[BufferedSink]] = {}
_OPEN_LOCK = threading.Lock()


class BufferedSink:
    """A ReadingSink that passes through to `inner` and stores to disk while `inner` cannot deliver.

    `path` is the SQLite file; `max_bytes` bounds what is buffered (message bodies, names and
    `ROW_OVERHEAD` per message; the file itself may be somewhat larger); when full, `drop` says which
    data goes: "oldest" (buffered rows not in flight, oldest first) or "newest" (what arrives). Every
    drop is counted in `stats` and logged. `delivery_timeout_s` is a backstop for inner sinks that do
    not report failures: it must exceed the inner's own give-up time, or a slow delivery is buffered
    too and may arrive twice. `retry_s` is the pause after a failed drain attempt (the next attempt
    sends one row as a probe); `drain_batch` caps the rows forwarded per round trip; `max_pending`
    caps the messages waiting in memory for the disk (publish blocks beyond it).
    """

    def __init__(
        self,
        inner: ReadingSink,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        drop: DropPolicy = "oldest",
        delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT_S,
        retry_s: float = 1.0,
        drain_batch: int = 2_000,
        max_pending: int = 50_000,
        report_every_s: float = 10.0,
        is_link_error: Callable[[BaseException], bool] | None = None,
    ) -> None:
        if drop not in ("oldest", "newest"):
            raise ValueError(f"drop must be 'oldest' or 'newest', not {drop!r}")
        if max_bytes <= 0 or drain_batch <= 0 or max_pending <= 0:
            raise ValueError("max_bytes, drain_batch and max_pending must be positive")
        self.inner = inner
        self.path = Path(path).absolute()
        self.max_bytes = max_bytes
        self.drop = drop
        self.delivery_timeout_s = delivery_timeout_s
        self.retry_s = retry_s
        self.drain_batch = drain_batch
        self.max_pending = max_pending
        self.report_every_s = report_every_s
        self._is_link_error = is_link_error or (lambda exc: isinstance(exc, LINK_ERRORS))
        self.stats = BufferStats()

        # Lock order: _gate, then _lock. _gate is held while a message is handed to the inner sink
        # in pass-through, so the worker can hand over its backlog before anything newer goes.
        self._gate = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the worker waits on it
        self._space = threading.Condition(self._lock)  # publishers wait on it when the disk lags
        self._storing = False  # False: pass-through; True: everything goes to disk
        self._outstanding: dict[int, _Item] = {}  # passed through, not yet confirmed or failed
        self._to_store: list[_Item] = []  # waiting for the worker's next commit
        self._undone = 0  # handed over, `done` not yet called
        self._failed_devices: dict[tuple[str | None, str | None], int] = {}  # oldest failed seq per device
        self._late: list[int] = []  # seqs confirmed after being given up on: delete if still buffered
        self._watch: dict[tuple[str | None, str | None], int] | None = None  # newest delivered seq per device
        self._batch: _Batch | None = None  # forwarded rows in flight (worker-owned)
        self._probe = True  # the next drain attempt sends one row
        self._failed_attempts = 0  # consecutive drain attempts that failed
        self._next_attempt = 0.0
        self._outage_started = 0.0
        self._next_expiry_check = 0.0
        self._last_report = 0.0
        self._last_drop_log = 0.0
        self._drops_unlogged = 0
        self._closing = False
        self._stop = False
        self._closed = False

        self.path.parent.mkdir(parents=True, exist_ok=True)
        _take_over(self)
        self._lock_file = _lock_file(self.path)
        try:
            self._db = _open_db(self.path)
            rows, size, max_seq = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(max(seq), 0) FROM buffered"
            ).fetchone()
        except BaseException:
            self._lock_file.close()
            raise
        self._rows: int = rows
        self._bytes: int = size
        self._next_seq: int = max_seq + 1
        if rows:
            # A buffer left by an earlier run: it drains first, and everything new queues behind it.
            self._storing = True
            self._outage_started = time.monotonic()
            log.warning(
                "store-and-forward buffer %s holds %d messages (%.1f MB) from an earlier run; draining them first",
                self.path,
                rows,
                size / 1e6,
            )
        with _OPEN_LOCK:
            _OPEN[str(self.path)] = weakref.ref(self)
        self._thread = threading.Thread(target=self._run, name=f"buffer-{self.path.stem}", daemon=True)
        self._thread.start()

    # --- ReadingSink -------------------------------------------------------------------------

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        """Hand over one device's readings: to the inner sink, or to disk while that cannot deliver."""
        self._hand_over(_Item(self, _READINGS, tenant_id, device_id, source, readings, "", "", b"", done))

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
        """Hand over a dead letter; buffered like readings while the inner sink cannot deliver."""
        self._hand_over(_Item(self, _REJECT, tenant_id, device_id, source, [], origin, reason, payload, done))

    def poll(self, timeout: float = 0.0) -> None:
        """Serve the inner sink's delivery callbacks."""
        self.inner.poll(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait until everything handed over is durable (delivered, or committed to disk) and its `done`
        was called; returns how many messages are still pending. Buffered rows stay buffered."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = self._undone
            if pending == 0 or time.monotonic() >= deadline:
                return pending
            self.inner.poll(0.05)  # delivery reports resolve outstanding messages

    # --- more than a ReadingSink ----------------------------------------------------------------

    @property
    def storing(self) -> bool:
        """True while new data goes to disk (link down, or older data still buffered)."""
        return self._storing

    @property
    def buffered_messages(self) -> int:
        """Messages on disk now."""
        return self._rows

    @property
    def buffered_bytes(self) -> int:
        """Bytes counted against `max_bytes` now."""
        return self._bytes

    def link_down(self, reason: str) -> None:
        """A hint that the link is down (e.g. Kafka's "all brokers down"): buffer new data at once
        rather than letting it wait for the inner sink's own timeout. Harmless if wrong: the buffer
        drains as soon as the inner confirms again."""
        with self._lock:
            if not self._storing and not self._closed:
                self._start_outage(reason)

    def close(self, timeout: float = 30.0) -> None:
        """Make everything handed over durable, let rows in flight settle, stop the worker, release the
        file (and close the inner sink when it has `close`). Rows still buffered stay for the next run."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._lock:
            self._closing = True  # no new drain batches
            self._wake.notify_all()
        while self._batch is not None and time.monotonic() < deadline:
            self.inner.poll(0.05)
        with self._lock:
            self._stop = True
            self._wake.notify_all()
            self._space.notify_all()
        self._thread.join(max(1.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("buffer worker for %s did not stop; leaving the database open", self.path)
        else:
            self._db.close()
        with self._lock:
            self._closed = True
        with _OPEN_LOCK:
            ref = _OPEN.get(str(self.path))
            if ref is not None and ref() is self:
                del _OPEN[str(self.path)]
        self._lock_file.close()  # releases the flock
        if self._rows:
            log.info("buffer %s closed holding %d messages; the next run drains them", self.path, self._rows)
        close_inner = getattr(self.inner, "close", None)
        if callable(close_inner):
            close_inner()

    # --- hand-over and delivery reports (any thread) --------------------------------------------

    def _hand_over(self, item: _Item) -> None:
        with self._gate:
            with self._lock:
                if self._closed or self._stop:
                    raise RuntimeError(f"the store-and-forward buffer {self.path} is closed")
                item.seq = self._next_seq
                self._next_seq += 1
                self._undone += 1
                storing = self._storing
                if storing:
                    self._to_store.append(item)
                    self._wake.notify()
                else:
                    item.deadline = time.monotonic() + self.delivery_timeout_s
                    self._outstanding[item.seq] = item
            if not storing:
                try:
                    self._pass(item)
                except BaseException:  # not a link problem: the caller sees the error, as without a buffer
                    with self._lock:
                        if self._outstanding.pop(item.seq, None) is not None:
                            self._undone -= 1
                    raise
                return
        with self._lock:  # the disk lags behind: hold the source back
            while len(self._to_store) >= self.max_pending and not self._stop:
                self._space.wait(1.0)

    def _pass(self, item: _Item) -> None:
        """Give one registered message to the inner sink; a link error sends it to the buffer (gate held)."""
        try:
            if item.kind == _READINGS:
                self.inner.publish(item.tenant_id, item.device_id, item.source, item.readings, done=item)  # type: ignore[arg-type]
            else:
                self.inner.reject(
                    item.source,
                    item.origin,
                    item.reason,
                    item.payload,
                    item.tenant_id,
                    item.device_id,
                    done=item,
                )
        except Exception as exc:
            if not self._is_link_error(exc):
                raise
            item.failed(f"{type(exc).__name__}: {exc}")

    def _delivered(self, item: _Item) -> None:
        with self._lock:
            if self._outstanding.pop(item.seq, None) is None:
                # Given up on by the backstop and buffered: drop the buffered copy if not yet forwarded.
                self.stats.late += 1
                self._late.append(item.seq)
                self._wake.notify()
                log.warning("message %d was confirmed after it had been buffered; it may arrive twice", item.seq)
                return
            self.stats.passed += 1
            if self._watch is not None:
                key = (item.tenant_id, item.device_id)
                if item.seq > self._watch.get(key, 0):
                    self._watch[key] = item.seq
            if self._failed_devices:
                first = self._failed_devices.get((item.tenant_id, item.device_id))
                if first is not None and first < item.seq:
                    self._out_of_order(item.tenant_id, item.device_id)
        try:
            if item.done is not None:
                item.done()
        finally:
            with self._lock:
                self._undone -= 1

    def _failed(self, item: _Item, reason: str) -> None:
        with self._lock:
            if self._outstanding.pop(item.seq, None) is None:
                return  # already resolved
            if not self._storing:
                self._start_outage(reason)
            key = (item.tenant_id, item.device_id)
            if key not in self._failed_devices or item.seq < self._failed_devices[key]:
                self._failed_devices[key] = item.seq
            self._to_store.append(item)  # no waiting here: this may be the inner's callback thread
            self._wake.notify()

    def _start_outage(self, reason: str) -> None:
        """Switch to storing (lock held)."""
        self._storing = True
        self._probe = True
        self._next_attempt = time.monotonic() + self.retry_s
        self._outage_started = time.monotonic()
        self.stats.outages += 1
        log.warning("link down (%s): buffering to %s", reason, self.path)

    def _out_of_order(self, tenant_id: str | None, device_id: str | None) -> None:
        """Count and log a device whose newer message got through before an older buffered one (lock held)."""
        self.stats.out_of_order += 1
        log.warning(
            "device %s/%s: a newer message was delivered before an older buffered one "
            "(the link failed and recovered within one delivery timeout); per-device order is broken once",
            tenant_id,
            device_id,
        )

    def _forward_resolved(self, ticket: _Forwarded, error: str | None) -> None:
        with self._lock:
            batch = ticket.batch
            if batch.finished:  # resolved after the backstop gave up on it
                if error is None:
                    self.stats.late += 1
                    self._late.append(ticket.seq)
                    self._wake.notify()
                return
            if error is None:
                batch.confirmed.append(ticket.seq)
            else:
                batch.failed.append((ticket.seq, error))
            batch.pending -= 1
            if batch.pending == 0:
                self._wake.notify()

    # --- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if not (self._to_store or self._late or self._stop or self._batch_settled()):
                    self._wake.wait(self._idle_wait())
                late, self._late = self._late, []
                stop = self._stop
            items: list[_Item] = []
            try:
                if late:
                    self._delete(late, late=True)
                self._expire()
                if self._batch is not None and self._batch_due(self._batch):
                    self._settle(self._batch)
                items = self._hand_over_backlog()
                if items:
                    self._store(items)
                    items = []  # committed: never again
                self._forward()
                self._report()
            except sqlite3.Error:  # the disk failing (full, read-only): keep the data in memory and retry
                log.exception("store-and-forward buffer %s failed; retrying in %.1f s", self.path, self.retry_s)
                with self._lock:
                    self._to_store[:0] = items
                    self._late[:0] = late
                    self._next_attempt = time.monotonic() + self.retry_s
                time.sleep(self.retry_s)
                continue
            except Exception:
                log.exception(
                    "store-and-forward buffer %s: unexpected error; retrying in %.1f s", self.path, self.retry_s
                )
                with self._lock:
                    self._to_store[:0] = items
                    self._next_attempt = time.monotonic() + self.retry_s
                time.sleep(self.retry_s)
            if stop and self._batch is None:
                with self._lock:
                    if not self._to_store:
                        return

    def _batch_due(self, batch: _Batch) -> bool:
        """Every row of the batch is confirmed or failed, or the backstop expired."""
        if batch.pending and time.monotonic() < batch.deadline:
            self.inner.poll(0)  # in case nobody else serves the inner's callbacks
            return batch.pending == 0
        return True

    def _hand_over_backlog(self) -> list[_Item]:
        """Take the messages waiting for the disk, and return them to be stored.

        When the link has been proven since the last failure (a drain batch went through) and every row
        on disk has already been handed to the inner sink, pass them to the inner right behind those rows
        instead and go back to pass-through: a backlog fed by a live source never reaches zero otherwise.
        """
        with self._gate:
            with self._lock:
                items, self._to_store = self._to_store, []
                if items:
                    self._space.notify_all()
                batch = self._batch
                in_flight = len(batch.rows) if batch is not None else 0
                if not (
                    self._storing
                    and not self._closing
                    and not self._outstanding
                    and not self._probe
                    and self._rows == in_flight
                    and (batch is None or not batch.failed)
                ):
                    return items
                self._storing = False
                self._failed_devices.clear()
                self._watch = {} if batch is not None else None  # to notice overtaking if the batch then fails
                items.sort(key=lambda i: i.seq)
                deadline = time.monotonic() + self.delivery_timeout_s
                for it in items:
                    it.deadline = deadline
                    self._outstanding[it.seq] = it
                log.warning(
                    "link restored: buffer %s drained after %.1f s "
                    "(buffered %d, forwarded %d, dropped %d messages so far)",
                    self.path,
                    time.monotonic() - self._outage_started,
                    self.stats.buffered,
                    self.stats.drained + in_flight,
                    self.stats.dropped,
                )
            for it in items:  # the gate is held: nothing newer reaches the inner before these
                try:
                    self._pass(it)
                except Exception as exc:  # not a link error: buffer it anyway; draining dead-letters it
                    it.failed(f"{type(exc).__name__}: {exc}")
        if batch is None:
            self._compact()
        return []

    def _batch_settled(self) -> bool:
        return self._batch is not None and self._batch.pending == 0

    def _idle_wait(self) -> float:
        if self._batch is not None:
            return 0.02
        return 0.05 if self._storing else 0.5

    def _store(self, items: list[_Item]) -> None:
        """Append items to disk in one transaction (making room per the drop policy), then call their `done`."""
        items.sort(key=lambda i: i.seq)
        stored_at = now_us()
        rows: list[tuple[_Item, tuple[Any, ...], int]] = []
        for it in items:
            body = (
                encode_envelope(it.tenant_id, it.device_id, it.source, it.readings)  # type: ignore[arg-type]
                if it.kind == _READINGS
                else it.payload
            )
            size = (
                ROW_OVERHEAD + len(body) + sum(len(s or "") for s in (it.tenant_id, it.device_id, it.origin, it.reason))
            )
            values = (
                it.seq, it.kind, it.tenant_id, it.device_id, it.source, it.origin, it.reason,
                it.n_readings, size, stored_at, body,
            )  # fmt: skip
            rows.append((it, values, size))
        keep, dropped, cut = self._make_room(rows)
        freed_rows = freed_bytes = freed_readings = 0
        with _transaction(self._db):
            if cut is not None:
                lo, hi = cut
                freed_rows, freed_bytes, freed_readings = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(readings), 0) FROM buffered "
                    "WHERE seq > ? AND seq <= ?",
                    (lo, hi),
                ).fetchone()
                self._db.execute("DELETE FROM buffered WHERE seq > ? AND seq <= ?", (lo, hi))
            self._db.executemany(
                "INSERT INTO buffered (seq, kind, tenant_id, device_id, source, origin, reason, readings, size, "
                "stored_at_us, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [values for _, values, _ in keep],
            )
        self._rows += len(keep) - freed_rows
        self._bytes += sum(size for _, _, size in keep) - freed_bytes
        with self._lock:
            self.stats.buffered += len(keep)
            self.stats.buffered_readings += sum(it.n_readings for it, _, _ in keep)
            if freed_rows or dropped:
                self.stats.dropped += freed_rows + len(dropped)
                self.stats.dropped_readings += freed_readings + sum(it.n_readings for it in dropped)
        if freed_rows or dropped:
            self._log_drop(freed_rows + len(dropped))
        # Committed (or deliberately dropped): the source may forget these messages now.
        for it, _, _ in keep:
            self._call_done(it)
        for it in dropped:
            self._call_done(it)

    def _make_room(
        self, rows: list[tuple[_Item, tuple[Any, ...], int]]
    ) -> tuple[list[tuple[_Item, tuple[Any, ...], int]], list[_Item], tuple[int, int] | None]:
        """Which incoming rows to keep, which to drop, and which stored seq range (lo, hi] to delete."""
        need = self._bytes + sum(size for _, _, size in rows) - self.max_bytes
        if need <= 0:
            return rows, [], None
        if self.drop == "newest":
            keep, dropped, total = [], [], self._bytes
            for row in rows:
                if total + row[2] <= self.max_bytes:
                    keep.append(row)
                    total += row[2]
                else:
                    dropped.append(row[0])
            return keep, dropped, None
        # Oldest first, over stored rows (except those in flight) and incoming ones merged by seq.
        lo = self._batch.hi if self._batch is not None else 0
        stored = self._db.execute("SELECT seq, size FROM buffered WHERE seq > ? ORDER BY seq", (lo,))
        nxt = stored.fetchone()
        freed, cut, i = 0, None, 0
        while freed < need and (nxt is not None or i < len(rows)):
            if nxt is not None and (i >= len(rows) or nxt[0] < rows[i][0].seq):
                freed += nxt[1]
                cut = nxt[0]
                nxt = stored.fetchone()
            else:
                freed += rows[i][2]
                i += 1
        stored.close()
        return rows[i:], [row[0] for row in rows[:i]], (lo, cut) if cut is not None else None

    def _log_drop(self, n: int) -> None:
        self._drops_unlogged += n
        now = time.monotonic()
        if now - self._last_drop_log >= self.report_every_s:
            log.warning(
                "store-and-forward buffer %s is full (%d bytes): dropped %d %s messages (%d since start, %d readings)",
                self.path,
                self.max_bytes,
                self._drops_unlogged,
                self.drop,
                self.stats.dropped,
                self.stats.dropped_readings,
            )
            self._drops_unlogged = 0
            self._last_drop_log = now

    def _call_done(self, item: _Item) -> None:
        try:
            if item.done is not None:
                item.done()
        except Exception:
            log.exception("acknowledging message %d failed", item.seq)
        finally:
            with self._lock:
                self._undone -= 1

    def _expire(self) -> None:
        """Give up on passed-through messages the inner neither confirmed nor failed within the backstop."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + 0.25
        with self._lock:
            expired = list(itertools.takewhile(lambda it: it.deadline <= now, self._outstanding.values()))
        for it in expired:
            it.failed(f"no delivery report within {self.delivery_timeout_s:g} s")

    def _forward(self) -> None:
        """Send the next drain batch when nothing is in flight and the retry pause is over."""
        if self._batch is not None:
            return
        with self._lock:
            if not self._storing or self._closing or self._outstanding:
                return  # passed-through messages still in the air: nothing buffered may go before they settle
            # Messages waiting for the disk: rows older than all of them may go, the rest wait for them.
            horizon = min((it.seq for it in self._to_store), default=None)
        if self._rows == 0 or time.monotonic() < self._next_attempt:
            return
        self._send(1 if self._probe else self.drain_batch, horizon)

    def _send(self, limit: int, horizon: int | None) -> None:
        """Forward the oldest `limit` rows (below `horizon`); a link error stops the batch at that row."""
        cur = self._db.execute(
            "SELECT seq, kind, tenant_id, device_id, source, origin, reason, readings, size, body "
            "FROM buffered WHERE seq < ? ORDER BY seq LIMIT ?",
            (horizon if horizon is not None else self._next_seq, limit),
        )
        rows = [_Row(*r) for r in cur.fetchall()]
        if not rows:
            if horizon is None:  # the counts disagree with the file: trust the file
                self._rows, self._bytes = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0) FROM buffered"
                ).fetchone()
            return
        batch = _Batch(time.monotonic() + self.delivery_timeout_s)
        self._batch = batch
        for row in rows:
            ticket = _Forwarded(self, batch, row.seq)
            with self._lock:
                batch.rows[row.seq] = row
                batch.pending += 1
            try:
                self._forward_row(row, ticket)
            except Exception as exc:
                if self._is_link_error(exc):
                    ticket.failed(f"{type(exc).__name__}: {exc}")
                    break  # later rows wait: they must not overtake this one
                self._dead_letter(row, ticket, exc)

    def _forward_row(self, row: _Row, ticket: _Forwarded) -> None:
        if row.kind == _READINGS:
            readings = decode_envelope(row.body)
            self.inner.publish(row.tenant_id, row.device_id, row.source, readings, done=ticket)  # type: ignore[arg-type]
        else:
            origin, reason = row.origin or "", row.reason or ""
            self.inner.reject(row.source, origin, reason, row.body, row.tenant_id, row.device_id, done=ticket)

    def _dead_letter(self, row: _Row, ticket: _Forwarded, exc: Exception) -> None:
        """A buffered row the inner refuses for a non-link reason goes to the dead-letter queue, so it
        cannot block the buffer; if even that fails, it is dropped (counted and logged)."""
        reason = f"store-and-forward could not forward a buffered message: {type(exc).__name__}: {exc}"
        log.error("%s (seq %d, %s/%s)", reason, row.seq, row.tenant_id, row.device_id)
        try:
            self.inner.reject(
                row.source, "store-and-forward", reason, row.body, row.tenant_id, row.device_id, done=ticket
            )
        except Exception as again:
            if self._is_link_error(again):
                ticket.failed(str(again))
                return
            log.error("dropping buffered message %d: the dead-letter queue refused it too: %s", row.seq, again)
            with self._lock:
                self.stats.dropped += 1
                self.stats.dropped_readings += row.readings
                ticket.batch.discarded.add(row.seq)
            ticket()  # resolved: its row is deleted like a delivered one
            return
        with self._lock:
            self.stats.dead_lettered += 1

    def _settle(self, batch: _Batch) -> None:
        """Delete what the inner confirmed; keep the rest on disk for the next attempt, after a pause."""
        with self._lock:
            batch.finished = True
            confirmed = list(batch.confirmed)
            failed = list(batch.failed)
            watch, self._watch = self._watch, None
        self._batch = None
        if confirmed:
            self._delete(confirmed)
            delivered = [s for s in confirmed if s not in batch.discarded]
            with self._lock:
                self.stats.drained += len(delivered)
                self.stats.drained_readings += sum(batch.rows[s].readings for s in delivered)
        resolved = set(confirmed) | {seq for seq, _ in failed}
        unresolved = [seq for seq in batch.rows if seq not in resolved]
        if not failed and not unresolved:
            self._probe = False  # the link works: full batches from now on
            self._failed_attempts = 0
            if not self._storing and self._rows == 0:  # the last batch of a hand-over
                self._compact()
            return
        reason = failed[0][1] if failed else f"no delivery report within {self.delivery_timeout_s:g} s"
        first_failed: dict[tuple[str | None, str | None], int] = {}
        for seq in sorted([seq for seq, _ in failed] + unresolved):
            r = batch.rows[seq]
            first_failed.setdefault((r.tenant_id, r.device_id), seq)
        with self._lock:
            # A newer message of the same device that got through first (a gap): order broken, counted.
            newer = [(batch.rows[s].tenant_id, batch.rows[s].device_id, s) for s in confirmed]
            newer += [(t, d, s) for (t, d), s in (watch or {}).items()]
            for tenant_id, device_id, seq in newer:
                first = first_failed.get((tenant_id, device_id))
                if first is not None and first < seq:
                    self._out_of_order(tenant_id, device_id)
            if not self._storing:  # the link failed again right after the hand-over
                self._start_outage(reason)
            for key, seq in first_failed.items():
                self._failed_devices[key] = min(seq, self._failed_devices.get(key, seq))
            self._probe = True
            self._next_attempt = time.monotonic() + self.retry_s
        self._failed_attempts += 1
        log.log(
            logging.INFO if self._failed_attempts == 1 else logging.DEBUG,  # the periodic report covers the rest
            "draining %s: %d of %d forwarded messages not delivered (%s); retrying every %.1f s",
            self.path,
            len(failed) + len(unresolved),
            len(batch.rows),
            reason,
            self.retry_s,
        )

    def _delete(self, seqs: list[int], late: bool = False) -> None:
        """Delete rows by seq (those absent are ignored) and keep the row and byte counts exact."""
        rows = size = 0
        with _transaction(self._db):
            for i in range(0, len(seqs), 500):
                chunk = seqs[i : i + 500]
                marks = ",".join("?" * len(chunk))
                n, b = self._db.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM buffered WHERE seq IN ({marks})", chunk
                ).fetchone()
                self._db.execute(f"DELETE FROM buffered WHERE seq IN ({marks})", chunk)
                rows, size = rows + n, size + b
        self._rows -= rows
        self._bytes -= size
        if late and rows:
            log.info("removed %d buffered copies of messages that were confirmed late", rows)

    def _compact(self) -> None:
        """Give disk space back once empty."""
        try:
            self._db.execute("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("could not compact %s: %s", self.path, exc)

    def _report(self) -> None:
        now = time.monotonic()
        if not self._storing or now - self._last_report < self.report_every_s:
            return
        self._last_report = now
        s = self.stats
        log.info(
            "buffering to %s: %d messages (%.1f MB) on disk; buffered=%d drained=%d dropped=%d out_of_order=%d",
            self.path,
            self._rows,
            self._bytes / 1e6,
            s.buffered,
            s.drained,
            s.dropped,
            s.out_of_order,
        )


# --- SQLite and file locking ---------------------------------------------------------------------


def _open_db(path: Path) -> sqlite3.Connection:
    """The buffer database: WAL journal, fsync on commit, space reclaimable."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"{path}: SQLite refused WAL mode ({mode})")
    db.execute("PRAGMA synchronous = FULL")  # a commit is on disk before `done` acknowledges the source
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        raise RuntimeError(f"{path}: buffer format {version} is not {SCHEMA_VERSION}; drain it with that version")
    db.execute(
        """CREATE TABLE IF NOT EXISTS buffered (
            seq INTEGER PRIMARY KEY,      -- arrival order; drained in this order
            kind INTEGER NOT NULL,        -- 0: readings (body is a Kafka envelope), 1: dead letter (original bytes)
            tenant_id TEXT,
            device_id TEXT,
            source TEXT NOT NULL,
            origin TEXT,
            reason TEXT,
            readings INTEGER NOT NULL,
            size INTEGER NOT NULL,        -- bytes counted against the bound
            stored_at_us INTEGER NOT NULL,
            body BLOB NOT NULL
        )"""
    )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _lock_file(path: Path) -> IO[str]:
    """An exclusive flock next to the database, held while the sink is open."""
    fh = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise BufferInUse(
            f"{path} is in use by {holder}; give each daemon its own buffer (state dir or client id)"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


def _take_over(new: BufferedSink) -> None:
    """Close a sink of this process that still has the same file open (a daemon restarted in-process)."""
    with _OPEN_LOCK:
        ref = _OPEN.get(str(new.path))
    old = ref() if ref is not None else None
    if old is not None and not old._closed:
        log.info("taking over %s from an earlier sink of this process", new.path)
        old.close()


# --- wiring ------------------------------------------------------------------------------------------


class _ReportingKafkaSink(KafkaSink):
    """A KafkaSink that tells its `done` ticket when a delivery failed (`done.failed(reason)`), so the
    buffer learns of it exactly instead of waiting for a backstop timeout."""

    def _delivery_callback(self, done: Done | None) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                if done is not None:
                    done()
                return
            self.delivery_errors += 1
            failed = getattr(done, "failed", None)
            if failed is not None:
                failed(f"Kafka: {err.str()}")
            else:
                log.error("Kafka delivery to %s failed: %s", msg.topic(), err)

        return on_delivery


def _setting(settings: Settings, name: str, default: Any) -> Any:
    """A buffer setting from Settings when it has the field, else the default."""
    value = getattr(settings, name, None)
    return default if value is None else value


def buffer_path(settings: Settings, name: str) -> Path:
    """Where the buffer of the daemon called `name` lives: `{buffer_dir or state_dir/buffers}/{name}.sqlite3`."""
    folder = _setting(settings, "buffer_dir", None) or Path(settings.state_dir) / "buffers"
    return Path(folder) / f"{name}.sqlite3"


def make_buffered_sink(
    settings: Settings | None = None,
    name: str = "ingest",
    *,
    path: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    drop: DropPolicy | None = None,
    link_timeout_s: float | None = None,
    retry_s: float | None = None,
) -> BufferedSink:
    """The daemons' sink: Kafka when SENSORMINE_KAFKA_BOOTSTRAP is set, else the in-process hot-store path,
    behind a store-and-forward buffer named after the daemon (`name`, e.g. its MQTT client id).

    Arguments override the settings `buffer_dir`, `buffer_max_bytes`, `buffer_drop`,
    `buffer_link_timeout_s` and `buffer_retry_s` (defaults apply while Settings lacks them).
    """
    settings = settings or get_settings()
    max_bytes = max_bytes or _setting(settings, "buffer_max_bytes", DEFAULT_MAX_BYTES)
    drop = drop or _setting(settings, "buffer_drop", "oldest")
    link_timeout_s = link_timeout_s or _setting(settings, "buffer_link_timeout_s", DEFAULT_LINK_TIMEOUT_S)
    retry_s = retry_s or _setting(settings, "buffer_retry_s", 1.0)
    path = path or buffer_path(settings, name)
    assert link_timeout_s is not None
    inner: ReadingSink
    holder: list[BufferedSink] = []  # the Kafka error callback needs the sink built below
    if settings.kafka_bootstrap:
        from sensormine.clients.kafka import make_producer

        def on_error(err: KafkaError) -> None:
            if err.fatal():
                log.critical("Kafka producer failed fatally (%s): restart the daemon", err.str())
            if err.code() == KafkaError._ALL_BROKERS_DOWN and holder:
                holder[0].link_down(f"Kafka: {err.str()}")

        link_ms = round(link_timeout_s * 1000)
        request_ms = max(link_ms, 10_000)
        producer = make_producer(
            settings,
            **{
                # An unreachable broker fails a message after link_timeout_s, which sends it to the buffer.
                "message.timeout.ms": link_ms,
                "request.timeout.ms": request_ms,
                "socket.timeout.ms": request_ms,
                "reconnect.backoff.max.ms": 1_000,  # notice a returning broker within a second
                "error_cb": on_error,
            },
        )
        inner = _ReportingKafkaSink(settings, producer)
        # Backstop above anything librdkafka may take to report (message, request and socket timeouts).
        backstop = link_timeout_s + 2 * request_ms / 1000 + 10
    else:
        from sensormine.clients.postgres import connect

        inner = DirectSink(lambda: connect(settings), settings)
        backstop = DEFAULT_DELIVERY_TIMEOUT_S  # DirectSink is synchronous: it never leaves a message pending
    sink = BufferedSink(inner, path, max_bytes=max_bytes, drop=drop, delivery_timeout_s=backstop, retry_s=retry_s)
    holder.append(sink)
    return sink
