"""Kafka → hot store: a consumer-group member that validates, batches and COPYs readings.

Offsets live in the hot store (`ingest_offsets`), committed in the same transaction as the rows,
so a crash at any point redelivers exactly what was not yet written: nothing lost, nothing doubled.

Messages of devices whose type has a schema are validated against its latest version
(`sensormine.schemas.validation.SchemaDirectory`); the others keep the fast path untouched. See docs/schemas.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from ingest_daemons.runner import run_restarting, stop_on_signals
from sensormine.clients.hotstore import CopyBatch, HotStoreWriter, KafkaOffset, WriteResult, stored_offsets
from sensormine.clients.kafka import make_consumer, make_producer
from sensormine.clients.postgres import INGEST, connect, migrate_database
from sensormine.ingest.sinks import dlq_headers
from sensormine.limits.storage import StorageGate
from sensormine.metering.usage_events import DATA_INGESTED, UsageEvent, store_usage_events
from sensormine.reading import now_us
from sensormine.schemas.validation import SchemaDirectory, SchemaViolation, exact_payload_items, payload_items
from sensormine.settings import Settings, get_settings
from sensormine.telemetry.payload import PayloadError, decode_envelope, decode_envelope_into
from sensormine.telemetry.validation import future_limit_us, validate_message

log = logging.getLogger("sensormine.ingest.consumer")
_JOIN_GRACE_S = 60.0  # a slow group join (busy machine) must not count as an idle stream
# A replayed message validated against a newer schema version than the cached one (its header
# `schema_version`) reloads the schemas before it is rejected, once they are older than this.
_SCHEMA_NEWER_S = 0.05

Headers = list[tuple[str, str | bytes | None]]


@dataclass
class ConsumerStats:
    """Counters since start."""

    messages: int = 0
    readings: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    # time.monotonic() of the first message received and of the last batch committed (throughput probes)
    first_message_at: float | None = None
    last_commit_at: float | None = None


@dataclass
class PreparedBatch:
    """One consumed batch after decoding and validation: COPY-ready rows and the offsets they complete."""

    rows: CopyBatch
    offsets: list[KafkaOffset]
    usage: list[UsageEvent] = field(default_factory=list)  # accepted payload bytes, per tenant


class BatchWriterThread:
    """Writes prepared batches on a second thread, one transaction each, strictly in submission order.

    psycopg releases the GIL while PostgreSQL works on a COPY, so the consuming thread decodes
    batch N+1 while the server inserts batch N. One writer and a FIFO keep every partition's
    offsets advancing in order, each committed in the same transaction as its rows.
    """

    def __init__(self, write: Callable[[PreparedBatch], object], depth: int = 1) -> None:
        self._write = write
        # depth 1: one batch queued while one is written; the consumer blocks beyond that (back-pressure).
        self._queue: queue.Queue[PreparedBatch | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="hotstore-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure nothing later may commit: its offsets would skip rows
                    self._write(item)
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise RuntimeError("hot-store write failed") from self._error

    def submit(self, batch: PreparedBatch) -> None:
        """Queue a batch for writing (blocks while the queue is full); raises if an earlier write failed."""
        self._raise_failure()
        self._queue.put(batch)

    def drain(self) -> None:
        """Wait until every submitted batch is committed; raises if one failed."""
        self._queue.join()
        self._raise_failure()

    def close(self) -> None:
        """Finish queued batches and stop the thread (failures are left to `drain`)."""
        self._queue.put(None)
        self._thread.join()


class HotStoreConsumer:
    """Consumes every tenant's telemetry topic into the hot store."""

    def __init__(self, settings: Settings | None = None, group_id: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.group_id = group_id or self.settings.consumer_group
        migrate_database(self.settings)
        self.conn = connect(self.settings, role=INGEST)
        self.writer = HotStoreWriter(self.conn, self.group_id)
        self.dlq = make_producer(self.settings, **{"linger.ms": 5})
        self.consumer: Consumer = make_consumer(self.group_id, self.settings)
        self.stats = ConsumerStats()
        self.schemas = SchemaDirectory(lambda: connect(self.settings, role=INGEST))
        # Readings of a quota group that stores its plan's limit or more are dead-lettered (replayable).
        self.storage = StorageGate(lambda: connect(self.settings, role=INGEST), self.settings.storage_quota_recheck_s)
        # A schema reject reloads the schemas first when they are older than this: a fix is picked up
        # at once, while a flood of bad messages costs one query per interval.
        self.schema_recheck_s = 1.0
        # (topic, key) of the devices that have a schema: which messages to validate, known before decoding.
        self._schema_keys: frozenset[tuple[str, bytes]] = frozenset()
        self._schema_generation = -1
        self._refresh_schemas()
        self.assigned = threading.Event()
        self._pipeline: BatchWriterThread | None = None
        self._kafka_commits: list[list[KafkaOffset]] = []  # written batches whose offsets Kafka has not been told

    def _drain(self) -> None:
        # Rebalances read and hand over offsets from the database: in-flight batches must land first,
        # and the writer must not be inside a transaction on the shared connection.
        if self._pipeline is not None:
            self._pipeline.drain()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The database, not Kafka, knows what has been written: resume from there.
        self._drain()
        offsets = stored_offsets(self.conn, self.group_id)
        self.conn.commit()
        for tp in partitions:
            tp.offset = offsets.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        self.assigned.set()
        log.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The next owner resumes from the database: commit what was consumed before letting go.
        self._drain()

    def _refresh_schemas(self, max_age_s: float | None = None) -> bool:
        """Reload the schema directory (when older than `max_age_s`, if given) and rebuild the index."""
        if max_age_s is None:
            self.schemas.refresh()
        elif not self.schemas.refresh_if_older(max_age_s):
            return False
        if self.schemas.generation != self._schema_generation:
            topic = self.settings.telemetry_topic
            self._schema_keys = frozenset((topic(t), d.encode()) for t, d in self.schemas.devices)
            self._schema_generation = self.schemas.generation
        return True

    def _reject(self, msg: Message, reason: str, extra: Headers | None = None) -> None:
        self.stats.rejected += 1
        key = msg.key()
        topic = msg.topic()
        origin = f"{topic}[{msg.partition()}]@{msg.offset()}"
        device = key.decode(errors="replace") if key else None
        headers = dlq_headers("consumer", origin, reason, self.settings.tenant_of_telemetry_topic(topic), device)
        # A replayed message that fails again says which dead letter it came from.
        headers += [(k, v) for k, v in _headers(msg) if k == "replay_of"]
        headers += extra or []
        self.dlq.produce(self.settings.dlq_topic, value=msg.value(), key=key, headers=headers)

    @staticmethod
    def _schema_subject(raw: bytes) -> tuple[str, str, list[dict[str, Any]]] | None:
        """(tenant, device, payload items) of an envelope, to validate; None to let the usual path judge
        it (not an envelope, or readings the reference path rejects anyway)."""
        try:
            doc = orjson.loads(raw)
            tenant_id, device_id, points = doc["tenant_id"], doc["device_id"], doc["points"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if type(tenant_id) is not str or type(device_id) is not str:
            return None
        items = exact_payload_items(points)
        if items is not None:
            return tenant_id, device_id, items
        try:
            readings = decode_envelope(raw)  # lenient types: validate what the reference path would write
        except PayloadError:
            return None
        if any(type(r.ts) is not int for r in readings):
            return None  # the reference path rejects it as malformed
        return tenant_id, device_id, payload_items((r.metric, r.ts, r.value, r.quality) for r in readings)

    def _schema_reject(self, msg: Message, raw: bytes) -> tuple[str, Headers] | None:
        """Why a message of a device with a schema breaks it (reason and DLQ headers), or None."""
        subject = self._schema_subject(raw)
        if subject is None:
            return None
        tenant_id, device_id, items = subject
        schema = self.schemas.for_device(tenant_id, device_id)  # the body decides whose readings these are
        violation = None if schema is None else schema.check_items(items)
        if violation is None:
            return None
        # Before rejecting, make sure the verdict is not that of an outdated version.
        newer = any(
            k == "schema_version" and v is not None and v.isascii() and v.isdigit() and int(v) > violation.version
            for k, v in _headers(msg)
        )  # fmt: skip
        if self._refresh_schemas(_SCHEMA_NEWER_S if newer else self.schema_recheck_s):
            schema = self.schemas.for_device(tenant_id, device_id)
            violation = None if schema is None else schema.check_items(items)
            if violation is None:
                return None
        return str(violation), _violation_headers(violation)

    def _decode_reference(self, raw: bytes, rows: CopyBatch, now: int) -> str | None:
        """The reference path for messages the fast path declines: the reject reason, or None once added."""
        try:
            readings = decode_envelope(raw)
        except PayloadError as exc:
            return str(exc)
        reason = validate_message(readings, self.settings, now)
        if reason is not None:
            return reason
        try:
            rows.add_readings(readings)
        except (TypeError, ValueError) as exc:
            # e.g. a float timestamp: it would fail the whole COPY, so the message goes to the DLQ instead.
            return f"malformed envelope: {exc}"
        return None

    def prepare(self, messages: list[Message]) -> PreparedBatch | None:
        """Decode and validate one batch of messages, dead-lettering the invalid; None when it had no message."""
        rows = CopyBatch()
        offsets: dict[tuple[str, int], int] = {}
        first: dict[tuple[str, int], int] = {}
        accepted: dict[str, list[int]] = {}  # topic -> [messages, bytes] accepted
        now = now_us()
        limit = future_limit_us(self.settings, now)
        rejected = self.stats.rejected
        if self.schemas.due():
            self._refresh_schemas()
        schema_keys = self._schema_keys  # empty unless some device has a schema: then one set lookup each
        refused: dict[str, str | None] = {}  # topic -> why its tenant's readings are refused now, or None
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("Kafka error: %s", err)
                continue
            # A message without an error always has a topic, partition and offset.
            topic, offset = cast(str, msg.topic()), cast(int, msg.offset())
            at = (topic, cast(int, msg.partition()))
            offsets[at] = offset + 1
            if at not in first:
                first[at] = offset
            self.stats.messages += 1
            raw = cast(bytes, msg.value())  # None (a tombstone) is rejected as a malformed envelope
            if topic in refused:
                refusal = refused[topic]
            else:
                tenant_id = self.settings.tenant_of_telemetry_topic(topic)
                refusal = refused[topic] = None if tenant_id is None else self.storage.refusal(tenant_id)
            if refusal is not None:
                self._reject(msg, refusal, [("quota", b"storage")])
                continue
            if schema_keys and (msg.topic(), msg.key()) in schema_keys:
                schema_reject = self._schema_reject(msg, raw)
                if schema_reject is not None:
                    self._reject(msg, *schema_reject)
                    continue
            if decode_envelope_into(raw, rows, limit) is None:
                reason = self._decode_reference(raw, rows, now)
                if reason is not None:
                    self._reject(msg, reason)
                    continue
            counted = accepted.get(topic)
            if counted is None:
                counted = accepted[topic] = [0, 0]
            counted[0] += 1
            counted[1] += len(raw)
        if not offsets:
            return None
        if self.stats.rejected != rejected:
            # Dead letters must be durable before the offsets that skip them are committed.
            self.dlq.flush(30)
        usage = self._usage(accepted, first, now) if self.settings.meter_ingest else []
        return PreparedBatch(rows, [KafkaOffset(t, p, o) for (t, p), o in offsets.items()], usage)

    def _usage(self, accepted: dict[str, list[int]], first: dict[tuple[str, int], int], now: int) -> list[UsageEvent]:
        """One data_ingested event per tenant topic of the batch. Its id names the records it covers
        (topic and first offset per partition): it commits with them, and the same records metered
        again would carry the same id."""
        at = datetime.fromtimestamp(now / 1e6, UTC)
        events = []
        for topic, (messages, size) in accepted.items():
            tenant_id = self.settings.tenant_of_telemetry_topic(topic)
            if tenant_id is None:
                continue
            starts = ",".join(f"{p}@{o}" for (t, p), o in sorted(first.items()) if t == topic)
            event_id = f"ingest:{self.group_id}:{topic}:{starts}"
            meta = {"messages": str(messages)}
            events.append(UsageEvent(event_id, tenant_id, at, DATA_INGESTED, size, "ingest:consumer", meta))
        return events

    def write(self, batch: PreparedBatch) -> WriteResult:
        """Write one prepared batch and its offsets in one transaction."""
        usage = batch.usage
        result = self.writer.write_batch(
            batch.rows, batch.offsets, (lambda conn: store_usage_events(conn, usage)) if usage else None
        )
        self._kafka_commits.append(batch.offsets)
        self.stats.readings += batch.rows.rows
        self.stats.inserted += result.inserted
        self.stats.duplicates += result.duplicates
        self.stats.batches += 1
        self.stats.last_commit_at = time.monotonic()
        return result

    def _commit_to_kafka(self) -> None:
        # Informational only (lag dashboards); the database holds the truth. Done on the consuming
        # thread, which owns the Kafka consumer.
        done: dict[tuple[str, int], int] = {}
        while self._kafka_commits:
            for o in self._kafka_commits.pop(0):
                done[(o.topic, o.partition)] = o.next_offset
        if done:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()], asynchronous=True)

    def process(self, messages: list[Message]) -> int:
        """Validate and write one batch of messages; returns readings inserted."""
        batch = self.prepare(messages)
        if batch is None:
            return 0
        result = self.write(batch)
        self._commit_to_kafka()
        return result.inserted

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> ConsumerStats:
        """Consume until `stop` is set (or, with `idle_exit_s`, until no message came for that long)."""
        self.consumer.subscribe(
            [self.settings.telemetry_topic_pattern],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        batch_target = self.settings.consumer_batch_size
        max_wait = self.settings.consumer_batch_ms / 1000
        last_message = started = time.monotonic()
        self._pipeline = pipeline = BatchWriterThread(self.write)
        try:
            while not stop.is_set():
                pending: list[Message] = []
                deadline = time.monotonic() + max_wait
                while len(pending) < batch_target and time.monotonic() < deadline:
                    got = self.consumer.consume(
                        num_messages=min(10_000, batch_target - len(pending)),
                        timeout=max(0.0, deadline - time.monotonic()),
                    )
                    if not got:
                        break
                    if self.stats.first_message_at is None:
                        self.stats.first_message_at = time.monotonic()
                    pending.extend(got)
                self._commit_to_kafka()
                if pending:
                    last_message = time.monotonic()
                    batch = self.prepare(pending)
                    if batch is not None:
                        pipeline.submit(batch)
                elif not self.assigned.is_set() and time.monotonic() - started < _JOIN_GRACE_S:
                    last_message = time.monotonic()  # idle time counts from joining the group, not from start
                elif idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
                    break
            pipeline.drain()
        finally:
            pipeline.close()
            self._pipeline = None
        self._commit_to_kafka()
        return self.stats

    def close(self) -> None:
        """Leave the group and close connections."""
        self.consumer.close()
        self.dlq.flush(30)
        self.conn.close()
        self.storage.close()


def _headers(msg: Message) -> list[tuple[str, bytes | None]]:
    """A message's Kafka headers (none: empty)."""
    found = msg.headers() or []
    pairs = list(found.items()) if isinstance(found, dict) else found
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def _violation_headers(violation: SchemaViolation) -> Headers:
    """DLQ headers recording which schema a message broke, and where."""
    return [
        ("device_type", violation.device_type.encode()),
        ("schema_version", str(violation.version).encode()),
        ("pointer", violation.pointer.encode()),
    ]


def run_forever(stop: threading.Event, settings: Settings | None = None, max_backoff_s: float = 30.0) -> None:
    """Consume until `stop`, starting over after any failure (a lost database, say) with backoff.

    Starting over is safe at any point: a new consumer resumes from the offsets stored with the rows.
    """
    run_restarting(stop, lambda: HotStoreConsumer(settings), "consumer", _log_stats, max_backoff_s)


def main() -> None:
    """Run the consumer until SIGTERM/SIGINT."""
    run_forever(stop_on_signals())


def _log_stats(consumer: HotStoreConsumer, prefix: str) -> None:
    s = consumer.stats
    log.info(
        "%smessages=%d readings=%d inserted=%d duplicates=%d rejected=%d",
        prefix, s.messages, s.readings, s.inserted, s.duplicates, s.rejected,
    )  # fmt: skip


if __name__ == "__main__":
    main()
