"""The usage ledger: counters moved to the `usage` table in crash-safe, idempotent batches (docs/quotas.md)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Protocol

import psycopg

from sensormine.metering.calendar import month_start, next_month_start

log = logging.getLogger(__name__)


API_CALLS = "api_calls"
ML_INFERENCE = "ml_inference"  # readings scored by an anomaly model (sensormine.anomaly.metering)


DEFAULT_FLUSH_INTERVAL_S = 5.0


FLUSH_BATCH_MEMBERS = 500  # (metric, tenant, day) counters moved per pending batch


LEDGER_KEEP = timedelta(days=7)  # a pending batch re-flushed later than this could be counted twice


LEDGER_PRUNE_EVERY_S = 3600.0


ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]


@dataclass(frozen=True)
class FlushBatch:
    """Counters moved out of the live counters under one flush id: (metric, tenant_id, day) -> count."""

    flush_id: str
    counts: dict[tuple[str, str, str], int]


def counter_member(metric: str, tenant_id: str, day: str) -> str:
    """The key of one (metric, tenant, day) counter inside the unflushed counters."""
    return f"{metric}|{tenant_id}|{day}"


def parse_counts(payload: str) -> dict[tuple[str, str, str], int]:
    """Counters taken as a JSON object of `counter_member` keys, by (metric, tenant_id, day)."""
    counts: dict[tuple[str, str, str], int] = {}
    for member, n in json.loads(payload).items():
        metric, tenant_id, day = member.split("|")
        counts[(metric, tenant_id, day)] = int(n)
    return counts


def usage_in_month(conn: psycopg.Connection, quota_tenant: str, metric: str, now: datetime) -> int:
    """What the `usage` table holds for a quota group (the tenant and its plan-less sub-tenants) this month."""
    row = conn.execute(
        "SELECT coalesce(sum(value), 0) FROM usage WHERE metric = %s AND day >= %s AND day < %s "
        "AND tenant_id IN (SELECT sensormine_quota_group(%s))",
        (metric, month_start(now).date(), next_month_start(now).date(), quota_tenant),
    ).fetchone()
    return int(row[0]) if row else 0


def write_batch(conn: psycopg.Connection, batch: FlushBatch) -> bool:
    """Add a batch to `usage` in one transaction, unless its flush id is already there; true if added."""
    rows = sorted(batch.counts.items())  # one lock order for every writer: no deadlocks between flushers
    with conn.transaction():
        new = conn.execute(
            "INSERT INTO usage_flushes (flush_id, rows, total) VALUES (%s, %s, %s) "
            "ON CONFLICT (flush_id) DO NOTHING RETURNING flush_id",
            (batch.flush_id, len(rows), sum(n for _, n in rows)),
        ).fetchone()
        if new is None:
            return False
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO usage (tenant_id, metric, day, value) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, metric, day) DO UPDATE "
                "SET value = usage.value + excluded.value, updated_at = now()",
                [(tenant_id, metric, date.fromisoformat(day), n) for (metric, tenant_id, day), n in rows],
            )
    return True


class UsageCounters(Protocol):
    """Where the unflushed counters live (limits.backends: Redis or memory), as the flusher needs them."""

    def take_batch(self, max_members: int) -> FlushBatch | None:
        """Atomically move unflushed counters into a new pending batch; None when there are none."""
        ...

    def pending_batches(self) -> list[FlushBatch]:
        """Batches taken but not yet acknowledged."""
        ...

    def ack(self, flush_id: str) -> None:
        """Forget a pending batch once the database holds it."""
        ...


class UsageFlusher:
    """Moves unflushed counters to the `usage` table every `interval_s`; completes pending batches first.

    `start()` flushes what an earlier process left pending, then keeps flushing in a daemon thread;
    `close()` stops the thread and flushes once more.
    """

    def __init__(
        self, backend: UsageCounters, connect: ConnectionFactory, interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    ):
        self.backend = backend
        self.connect = connect
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_prune = -math.inf

    def start(self) -> None:
        """Flush what is pending, then flush every `interval_s` in the background."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop flushing in the background, after one last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("the last usage flush failed; the counts stay in Redis for the next process")

    def _run(self) -> None:
        while True:
            try:
                self.flush()
            except Exception:
                log.exception("usage flush failed; retrying in %.1f s", self.interval_s)
            if self._stop.wait(self.interval_s):
                return

    def flush(self) -> int:
        """Complete pending batches, then move and write the live counters; returns the calls written."""
        with self._lock:
            written = 0
            for pending in self.backend.pending_batches():
                written += self._apply(pending)
            while (batch := self.backend.take_batch(FLUSH_BATCH_MEMBERS)) is not None:
                written += self._apply(batch)
            if time.monotonic() - self._last_prune >= LEDGER_PRUNE_EVERY_S:
                self._prune()
            return written

    def _apply(self, batch: FlushBatch) -> int:
        with self.connect() as conn:
            added = write_batch(conn, batch)
        self.backend.ack(batch.flush_id)
        return sum(batch.counts.values()) if added else 0

    def _prune(self) -> None:
        with self.connect() as conn, conn.transaction():
            conn.execute("DELETE FROM usage_flushes WHERE flushed_at < now() - %s", (LEDGER_KEEP,))
        self._last_prune = time.monotonic()
