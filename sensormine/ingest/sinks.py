"""Where daemons hand their readings and rejects: Kafka when configured, else the hot store in-process."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import psycopg
from confluent_kafka import KafkaError, Message, Producer

from sensormine.clients.hotstore import HotStoreWriter
from sensormine.limits.storage import StorageGate
from sensormine.metering.usage_events import DATA_INGESTED, UsageEvent, store_usage_events
from sensormine.reading import Reading, now_us
from sensormine.schemas.validation import SchemaDirectory
from sensormine.settings import Settings, get_settings
from sensormine.telemetry.payload import encode_envelope
from sensormine.telemetry.validation import validate_message

log = logging.getLogger(__name__)


Done = Callable[[], object]
"""Called once what was handed over is durable (in Kafka, or committed to the hot store)."""


class ReadingSink(Protocol):
    """What an ingest daemon writes to. `done`, when given, is called once the data is durable,
    so a daemon can acknowledge its source (an MQTT PUBACK) only then."""

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        """Hand over one device's normalised readings."""

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
        """Send a rejected payload, unchanged, to the dead-letter queue with its reason."""

    def poll(self, timeout: float = 0.0) -> None:
        """Serve pending delivery callbacks (call regularly when idle)."""

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for everything handed over to be durable; returns what is still pending."""


def dlq_headers(
    source: str, origin: str, reason: str, tenant_id: str | None, device_id: str | None
) -> list[tuple[str, str | bytes | None]]:
    """Kafka headers carried by a dead letter."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("reason", reason.encode()),
        ("source", source.encode()),
        ("origin", origin.encode()),
    ]
    if tenant_id:
        headers.append(("tenant_id", tenant_id.encode()))
    if device_id:
        headers.append(("device_id", device_id.encode()))
    headers.append(("rejected_at_us", str(now_us()).encode()))
    return headers


class KafkaSink:
    """Produces envelopes to `{env}.{tenant}.telemetry` keyed by device, rejects to `{env}.dlq`."""

    def __init__(self, settings: Settings | None = None, producer: Producer | None = None) -> None:
        from sensormine.clients.kafka import make_producer

        self.settings = settings or get_settings()
        self.producer = producer or make_producer(self.settings)
        self.delivery_errors = 0

    def _delivery_callback(self, done: Done | None) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                # Not acknowledged: the source keeps the message and delivers it again.
                self.delivery_errors += 1
                log.error("Kafka delivery to %s failed: %s", msg.topic(), err)
            elif done is not None:
                done()

        return on_delivery

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, str | bytes | None]] | None = None,
        done: Done | None = None,
    ) -> None:
        on_delivery = self._delivery_callback(done)
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka drain, then retry
                self.producer.poll(0.05)
        self.producer.poll(0)

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        self._produce(
            self.settings.telemetry_topic(tenant_id),
            device_id.encode(),
            encode_envelope(tenant_id, device_id, source, readings),
            done=done,
        )

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
        self._produce(
            self.settings.dlq_topic,
            device_id.encode() if device_id else None,
            payload,
            dlq_headers(source, origin, reason, tenant_id, device_id),
            done=done,
        )

    def poll(self, timeout: float = 0.0) -> None:
        self.producer.poll(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        return self.producer.flush(timeout)


def store_dead_letter(
    conn: psycopg.Connection,
    source: str,
    origin: str,
    reason: str,
    payload: bytes,
    tenant_id: str | None,
    device_id: str | None,
) -> None:
    """Keep a rejected payload in the database's dead-letter table (used without Kafka)."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO dead_letters (source, origin, tenant_id, device_id, reason, payload) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (source, origin, tenant_id, device_id, reason, payload),
        )


class DirectSink:
    """Without Kafka: validate and write to the hot store in-process, on the consumer's path."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        settings: Settings | None = None,
        after_write: Callable[[list[Reading]], object] | None = None,
        on_close: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self._connect = connect
        # Called with the readings once they are stored (the alarm processor:
        # sensormine.alerts.processor.watched_sink); its failure is logged and loses no reading.
        self._after_write = after_write
        self._on_close = on_close
        self._conn: psycopg.Connection | None = None
        self._writer: HotStoreWriter | None = None
        self._lock = threading.Lock()
        self._schemas: SchemaDirectory | None = None
        self._storage = StorageGate(connect, self.settings.storage_quota_recheck_s)
        self._open()

    def _schema_violation(self, tenant_id: str, device_id: str, readings: list[Reading]) -> str | None:
        """The consumer's schema check, in-process: why the readings break their device's schema, or None."""
        if self._schemas is None:
            self._schemas = SchemaDirectory(self._connect)
        if self._schemas.due():
            self._schemas.refresh()
        violation = self._schemas.check(tenant_id, device_id, readings)
        if violation is not None and self._schemas.refresh_if_older(1.0):  # a schema fixed just now
            violation = self._schemas.check(tenant_id, device_id, readings)
        return None if violation is None else str(violation)

    def _open(self) -> HotStoreWriter:
        # A connection lost with the database (restart, failover) is replaced on the next message.
        # Until the store-and-forward buffer exists, a message that meets the outage itself fails.
        if self._conn is None or self._conn.closed or self._writer is None:
            self._conn = self._connect()
            self._writer = HotStoreWriter(self._conn)
        return self._writer

    def _run(self, work: Callable[[HotStoreWriter], object]) -> None:
        with self._lock:
            try:
                work(self._open())
            except psycopg.OperationalError:
                # Most often an idle connection the server dropped: retry once on a new one (the
                # failed transaction rolled back, and the write dedupes, so a retry is safe).
                if self._conn is not None:
                    self._conn.close()
                work(self._open())

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        reason = (
            validate_message(readings, self.settings)
            or self._storage.refusal(tenant_id)
            or self._schema_violation(tenant_id, device_id, readings)
        )
        if reason is None:
            meter = self._meter(tenant_id, device_id, source, readings)
            self._run(lambda w: w.write(readings, also=meter))
            if self._after_write is not None:
                try:
                    self._after_write(readings)
                except Exception:
                    log.exception(
                        "evaluating alarm rules failed for %d readings of %s/%s", len(readings), tenant_id, device_id
                    )
        else:
            payload = encode_envelope(tenant_id, device_id, source, readings)
            self._run(lambda w: store_dead_letter(w.conn, source, "in-process", reason, payload, tenant_id, device_id))
        if done is not None:
            done()

    def _meter(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading]
    ) -> Callable[[psycopg.Connection], object] | None:
        """The usage event of accepted readings: the bytes of the envelope Kafka would have carried."""
        if not self.settings.meter_ingest:
            return None
        size = len(encode_envelope(tenant_id, device_id, source, readings))
        event = UsageEvent(
            uuid.uuid4().hex, tenant_id, datetime.now(UTC), DATA_INGESTED, size, "ingest:in-process",
            {"device_id": device_id, "readings": str(len(readings))},
        )  # fmt: skip
        return lambda conn: store_usage_events(conn, [event])

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
        self._run(lambda w: store_dead_letter(w.conn, source, origin, reason, payload, tenant_id, device_id))
        if done is not None:
            done()

    def poll(self, timeout: float = 0.0) -> None:
        # Nothing is ever pending here (writes are synchronous); wait like a Kafka poll would, so a
        # polling loop does not spin.
        time.sleep(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        return 0

    def close(self) -> None:
        """Close the connection (and stop what `on_close` stops)."""
        if self._on_close is not None:
            self._on_close()
        if self._conn is not None:
            self._conn.close()
        self._storage.close()


def make_sink(settings: Settings | None = None) -> ReadingSink:
    """Kafka when SENSORMINE_KAFKA_BOOTSTRAP is set, else the in-process path."""
    settings = settings or get_settings()
    if settings.kafka_bootstrap:
        return KafkaSink(settings)
    from sensormine.clients.postgres import INGEST, connect

    return DirectSink(lambda: connect(settings, role=INGEST), settings)
