"""Usage events: metered quantities with an id, stored and counted once (docs/billing.md, "Usage events").

Sources that hold no database transaction of their own (the API's egress meter) hand their events to
a `UsageEventSink`: the Kafka topic `{env}.metering.events` when Kafka is configured (the metering
consumer, `ingest_daemons.metering`, stores them), else the database directly. The hot-store writer
meters accepted payload bytes in the rows' own transaction instead (`store_usage_events`), which is
exactly once by construction. Either way `store_usage_events` keeps each event id once and adds new
events to the `usage` ledger (migration 032), so a replayed event is counted once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import psycopg

from sensormine.settings import Settings

log = logging.getLogger(__name__)

DATA_INGESTED = "data_ingested"  # bytes of accepted payload (the normalised envelope), by UTC day of ingest
DATA_EGRESS = "data_egress"  # bytes of API response bodies sent to a tenant's callers
EVENT_UNITS = {DATA_INGESTED: "bytes", DATA_EGRESS: "bytes"}  # the resources events carry (migration 032)

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]


class UsageEventError(ValueError):
    """A usage event that cannot be stored (malformed, unknown resource, negative quantity)."""


@dataclass(frozen=True)
class UsageEvent:
    """`quantity` of `resource` used by a tenant at `ts`; `event_id` is unique per occurrence."""

    event_id: str
    tenant_id: str
    ts: datetime
    resource: str
    quantity: int
    source: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.event_id or not self.tenant_id or not self.source:
            raise UsageEventError("a usage event needs an event_id, a tenant_id and a source")
        if self.resource not in EVENT_UNITS:
            raise UsageEventError(f"unknown resource {self.resource!r}; events carry {', '.join(EVENT_UNITS)}")
        if isinstance(self.quantity, bool) or not isinstance(self.quantity, int) or not 0 <= self.quantity < 2**63:
            raise UsageEventError(f"quantity must be a whole number from 0 to 2^63-1, not {self.quantity!r}")
        if self.ts.tzinfo is None:
            raise UsageEventError("ts must carry a time zone")

    @property
    def unit(self) -> str:
        return EVENT_UNITS[self.resource]

    def to_json(self) -> bytes:
        """The event as it travels on `{env}.metering.events`."""
        return orjson.dumps(
            {
                "event_id": self.event_id,
                "tenant_id": self.tenant_id,
                "ts": self.ts.astimezone(UTC).isoformat(),
                "resource": self.resource,
                "quantity": self.quantity,
                "unit": self.unit,
                "source": self.source,
                "metadata": self.metadata,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | None) -> UsageEvent:
        """Parse `to_json`'s form; a `UsageEventError` says what is wrong."""
        try:
            doc: Any = orjson.loads(raw or b"")
        except orjson.JSONDecodeError as exc:
            raise UsageEventError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise UsageEventError("a usage event is a JSON object")
        missing = [k for k in ("event_id", "tenant_id", "ts", "resource", "quantity", "source") if k not in doc]
        if missing:
            raise UsageEventError(f"missing {', '.join(missing)}")
        if doc["resource"] not in EVENT_UNITS:
            raise UsageEventError(f"unknown resource {doc['resource']!r}; events carry {', '.join(EVENT_UNITS)}")
        if doc.get("unit", EVENT_UNITS[doc["resource"]]) != EVENT_UNITS[doc["resource"]]:
            raise UsageEventError(f"unit {doc.get('unit')!r} is not {doc['resource']}'s")
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise UsageEventError("metadata must be an object")
        try:
            ts = datetime.fromisoformat(str(doc["ts"]))
        except ValueError:
            raise UsageEventError(f"ts {doc['ts']!r} is not ISO-8601") from None
        return cls(
            str(doc["event_id"]), str(doc["tenant_id"]), ts, str(doc["resource"]), doc["quantity"],
            str(doc["source"]), {str(k): str(v) for k, v in metadata.items()},
        )  # fmt: skip


def store_usage_events(conn: psycopg.Connection, events: Sequence[UsageEvent]) -> int:
    """Store events not seen before and add them to the ledger (caller's transaction); returns how many were new."""
    if not events:
        return 0
    row = conn.execute(
        "SELECT sensormine_store_usage_events(%s, %s, %s, %s, %s, %s, %s, %s::jsonb[])",
        (
            [e.event_id for e in events],
            [e.tenant_id for e in events],
            [e.ts for e in events],
            [e.resource for e in events],
            [e.quantity for e in events],
            [e.unit for e in events],
            [e.source for e in events],
            [orjson.dumps(e.metadata).decode() for e in events],
        ),
    ).fetchone()
    return int(row[0]) if row else 0


class UsageEventSink(Protocol):
    """Where a source hands its events; `emit` returns once they are durable, or raises."""

    def emit(self, events: Sequence[UsageEvent]) -> None: ...

    def close(self) -> None: ...


class DatabaseUsageEvents:
    """Without Kafka: events stored at once, one transaction per `emit`."""

    def __init__(self, connect: ConnectionFactory) -> None:
        self._connect = connect

    def emit(self, events: Sequence[UsageEvent]) -> None:
        with self._connect() as conn, conn.transaction():
            store_usage_events(conn, events)

    def close(self) -> None:
        pass


class KafkaUsageEvents:
    """Events produced to `{env}.metering.events`, keyed by tenant; `emit` waits for the broker's acks."""

    def __init__(self, settings: Settings) -> None:
        from sensormine.clients.kafka import make_producer

        self.topic = settings.metering_topic
        self._producer = make_producer(settings, **{"linger.ms": 5})

    def emit(self, events: Sequence[UsageEvent]) -> None:
        failed: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                failed.append(str(err))

        for e in events:
            self._producer.produce(self.topic, e.to_json(), e.tenant_id.encode(), on_delivery=delivered)
        left = self._producer.flush(30)
        if left or failed:
            raise RuntimeError(f"{left or len(failed)} usage events not acknowledged by Kafka: {failed[:1]}")

    def close(self) -> None:
        self._producer.flush(10)


def usage_event_sink(settings: Settings, connect: ConnectionFactory) -> UsageEventSink:
    """Kafka when configured, else the database (`connect`: a connection acting as the metering role)."""
    if settings.kafka_bootstrap:
        return KafkaUsageEvents(settings)
    return DatabaseUsageEvents(connect)


class ByteMeter:
    """Adds up bytes per tenant and UTC day in memory and emits them as usage events every `interval_s`.

    A batch taken for emitting keeps its event ids until the sink accepts it, so a failed emit is
    retried under the same ids and never counted twice. Counts not yet emitted die with the process
    (at most `interval_s` of them). Thread-safe; `count` is cheap enough for every API request.
    """

    def __init__(self, resource: str, source: str, sink: UsageEventSink, interval_s: float = 5.0) -> None:
        if resource not in EVENT_UNITS:
            raise UsageEventError(f"unknown resource {resource!r}")
        self.resource = resource
        self.source = source
        self.sink = sink
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}  # (tenant, ISO day) -> bytes
        self._pending: list[UsageEvent] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def count(self, tenant_id: str, n: int) -> None:
        """Count `n` bytes of a tenant, today (UTC)."""
        if n <= 0:
            return
        key = (tenant_id, datetime.now(UTC).date().isoformat())
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def unflushed(self) -> int:
        """Bytes counted and not yet emitted."""
        with self._lock:
            return sum(self._counts.values()) + sum(e.quantity for e in self._pending)

    def flush(self) -> int:
        """Emit what is pending, then the live counts; returns the bytes emitted now."""
        with self._lock:
            now = datetime.now(UTC)
            for (tenant_id, day), n in sorted(self._counts.items()):
                # An event of an earlier day keeps that day: its last microsecond.
                ts = now if day == now.date().isoformat() else datetime.fromisoformat(f"{day}T23:59:59.999999+00:00")
                self._pending.append(UsageEvent(uuid.uuid4().hex, tenant_id, ts, self.resource, n, self.source))
            self._counts = {}
            batch = list(self._pending)
        if not batch:
            return 0
        self.sink.emit(batch)
        with self._lock:
            del self._pending[: len(batch)]
        return sum(e.quantity for e in batch)

    def start(self) -> None:
        """Emit every `interval_s` in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"{self.resource}-meter", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception:
                log.exception("emitting %s usage failed; retrying in %.1f s", self.resource, self.interval_s)

    def close(self) -> None:
        """Stop the thread, emit once more, close the sink."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("the last %s usage emit failed: %d bytes not counted", self.resource, self.unflushed())
        self.sink.close()
