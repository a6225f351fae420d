"""Inference metering: scored rows per tenant and UTC day, as usage metric `ml_inference`.

Both scoring paths count here and hand the counts to `sensormine_meter_ml_inference` (migration
019), which adds a batch to the `usage` table once per flush id, exactly as the API-call ledger
does, and is all that the scorers' roles (sensormine_lake, sensormine_alerts) may do with usage.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime

import psycopg

from sensormine.metering.ledger import ML_INFERENCE

__all__ = ["ML_INFERENCE", "InferenceMeter", "meter_inference"]


def meter_inference(conn: psycopg.Connection, flush_id: str, counts: Mapping[tuple[str, date], int]) -> bool:
    """Add (tenant, day) -> scored rows to `usage` once per `flush_id` (caller's transaction); true if added."""
    items = sorted((k, n) for k, n in counts.items() if n > 0)
    if not items:
        return False
    row = conn.execute(
        "SELECT sensormine_meter_ml_inference(%s, %s, %s, %s)",
        (flush_id, [t for (t, _), _ in items], [d for (_, d), _ in items], [n for _, n in items]),
    ).fetchone()
    return bool(row and row[0])


class InferenceMeter:
    """Counts scored rows of a long-running scorer in memory until `flush` writes them. Thread-safe.

    A batch taken for a flush keeps its id until the database has it, so a failed flush is retried
    under the same id and never counted twice. Counts not yet flushed die with the process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, date], int] = {}
        self._pending: dict[str, dict[tuple[str, date], int]] = {}

    def count(self, tenant_id: str, n: int, at: datetime | None = None) -> None:
        """Count `n` scored rows of a tenant, on the UTC day of `at` (now by default)."""
        if n <= 0:
            return
        day = (at or datetime.now(UTC)).astimezone(UTC).date()
        with self._lock:
            self._counts[(tenant_id, day)] = self._counts.get((tenant_id, day), 0) + n

    def unflushed(self) -> dict[tuple[str, date], int]:
        """Counts not yet written, pending batches included."""
        with self._lock:
            out = dict(self._counts)
            for batch in self._pending.values():
                for key, n in batch.items():
                    out[key] = out.get(key, 0) + n
            return out

    def flush(self, conn: psycopg.Connection) -> int:
        """Write pending batches, then the live counts, one transaction each (`conn` idle); returns the rows written."""
        with self._lock:
            if self._counts:
                self._pending[uuid.uuid4().hex] = self._counts
                self._counts = {}
            pending = list(self._pending.items())
        written = 0
        for flush_id, batch in pending:
            with conn.transaction():
                added = meter_inference(conn, flush_id, batch)
            with self._lock:
                self._pending.pop(flush_id, None)
            written += sum(batch.values()) if added else 0
        return written
