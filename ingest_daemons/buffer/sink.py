"""`BufferedSink`: the store-and-forward state machine (pass-through, storing, hand-over, draining).

What is stored goes to a `Journal` (journal.py); the design is described in the package docstring.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from confluent_kafka import KafkaException

from ingest_daemons.buffer.journal import READINGS, REJECT, DropPolicy, Journal, Row
from sensormine.ingest.sinks import Done, ReadingSink
from sensormine.reading import Reading
from sensormine.telemetry.payload import decode_envelope, encode_envelope

log = logging.getLogger("sensormine.ingest.buffer")

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of buffered messages
DEFAULT_LINK_TIMEOUT_S = 5.0  # how long Kafka may fail to confirm a message before it is buffered
DEFAULT_DELIVERY_TIMEOUT_S = 60.0  # backstop for inner sinks that never report a failure

LINK_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    BufferError,
    KafkaException,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
"""Exceptions from an inner sink that mean "the link is down, try again later" (anything else is a bug
or a bad message, and is not buffered)."""


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


class _Batch:
    """Rows forwarded from disk and not yet all confirmed or failed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.rows: dict[int, Row] = {}
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

        self._journal = Journal(self.path, self)
        self._next_seq: int = self._journal.max_seq + 1
        if self._journal.rows:
            # A buffer left by an earlier run: it drains first, and everything new queues behind it.
            self._storing = True
            self._outage_started = time.monotonic()
            log.warning(
                "store-and-forward buffer %s holds %d messages (%.1f MB) from an earlier run; draining them first",
                self.path,
                self._journal.rows,
                self._journal.bytes / 1e6,
            )
        self._thread = threading.Thread(target=self._run, name=f"buffer-{self.path.stem}", daemon=True)
        self._thread.start()

    # --- ReadingSink -------------------------------------------------------------------------

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        """Hand over one device's readings: to the inner sink, or to disk while that cannot deliver."""
        self._hand_over(_Item(self, READINGS, tenant_id, device_id, source, readings, "", "", b"", done))

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
        self._hand_over(_Item(self, REJECT, tenant_id, device_id, source, [], origin, reason, payload, done))

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
        return self._journal.rows

    @property
    def buffered_bytes(self) -> int:
        """Bytes counted against `max_bytes` now."""
        return self._journal.bytes

    @property
    def closed(self) -> bool:
        """True once `close()` has let go of the worker and the database."""
        return self._closed

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
            self._journal.close_db()
        with self._lock:
            self._closed = True
        self._journal.release(self)
        if self._journal.rows:
            log.info("buffer %s closed holding %d messages; the next run drains them", self.path, self._journal.rows)
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
            if item.kind == READINGS:
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
                if late and (removed := self._journal.delete(late)):
                    log.info("removed %d buffered copies of messages that were confirmed late", removed)
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
                    and self._journal.rows == in_flight
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
            self._journal.compact()
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
        dropped_seqs, freed_rows, freed_readings = self._journal.append(
            [_row(it) for it in items],
            max_bytes=self.max_bytes,
            drop=self.drop,
            in_flight_hi=self._batch.hi if self._batch is not None else 0,
        )
        keep = [it for it in items if it.seq not in dropped_seqs]
        dropped = [it for it in items if it.seq in dropped_seqs]
        with self._lock:
            self.stats.buffered += len(keep)
            self.stats.buffered_readings += sum(it.n_readings for it in keep)
            if freed_rows or dropped:
                self.stats.dropped += freed_rows + len(dropped)
                self.stats.dropped_readings += freed_readings + sum(it.n_readings for it in dropped)
        if freed_rows or dropped:
            self._log_drop(freed_rows + len(dropped))
        # Committed (or deliberately dropped): the source may forget these messages now.
        for it in keep:
            self._call_done(it)
        for it in dropped:
            self._call_done(it)

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
        if self._journal.rows == 0 or time.monotonic() < self._next_attempt:
            return
        self._send(1 if self._probe else self.drain_batch, horizon)

    def _send(self, limit: int, horizon: int | None) -> None:
        """Forward the oldest `limit` rows (below `horizon`); a link error stops the batch at that row."""
        rows = self._journal.read(horizon if horizon is not None else self._next_seq, limit)
        if not rows:
            if horizon is None:  # the counts disagree with the file: trust the file
                self._journal.recount()
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

    def _forward_row(self, row: Row, ticket: _Forwarded) -> None:
        if row.kind == READINGS:
            readings = decode_envelope(row.body)
            self.inner.publish(row.tenant_id, row.device_id, row.source, readings, done=ticket)  # type: ignore[arg-type]
        else:
            origin, reason = row.origin or "", row.reason or ""
            self.inner.reject(row.source, origin, reason, row.body, row.tenant_id, row.device_id, done=ticket)

    def _dead_letter(self, row: Row, ticket: _Forwarded, exc: Exception) -> None:
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
            self._journal.delete(confirmed)
            delivered = [s for s in confirmed if s not in batch.discarded]
            with self._lock:
                self.stats.drained += len(delivered)
                self.stats.drained_readings += sum(batch.rows[s].readings for s in delivered)
        resolved = set(confirmed) | {seq for seq, _ in failed}
        unresolved = [seq for seq in batch.rows if seq not in resolved]
        if not failed and not unresolved:
            self._probe = False  # the link works: full batches from now on
            self._failed_attempts = 0
            if not self._storing and self._journal.rows == 0:  # the last batch of a hand-over
                self._journal.compact()
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

    def _report(self) -> None:
        now = time.monotonic()
        if not self._storing or now - self._last_report < self.report_every_s:
            return
        self._last_report = now
        s = self.stats
        log.info(
            "buffering to %s: %d messages (%.1f MB) on disk; buffered=%d drained=%d dropped=%d out_of_order=%d",
            self.path,
            self._journal.rows,
            self._journal.bytes / 1e6,
            s.buffered,
            s.drained,
            s.dropped,
            s.out_of_order,
        )


def _row(item: _Item) -> Row:
    """How an item is stored: readings as a Kafka envelope, a dead letter as its original bytes."""
    body = (
        encode_envelope(item.tenant_id, item.device_id, item.source, item.readings)  # type: ignore[arg-type]
        if item.kind == READINGS
        else item.payload
    )
    return Row.new(
        item.seq,
        item.kind,
        item.tenant_id,
        item.device_id,
        item.source,
        item.origin,
        item.reason,
        item.n_readings,
        body,
    )
