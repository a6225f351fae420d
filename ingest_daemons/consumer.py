"""Kafka → hot store: a consumer-group member that validates, batches and COPYs readings.

Offsets live in the hot store (`ingest_offsets`), committed in the same transaction as the rows,
so a crash at any point redelivers exactly what was not yet written: nothing lost, nothing doubled.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from sensormine.bus import dlq_headers
from sensormine.db import connect, migrate
from sensormine.hotstore import HotStoreWriter, KafkaOffset, stored_offsets
from sensormine.kafka import make_consumer, make_producer
from sensormine.payload import PayloadError, decode_envelope
from sensormine.reading import Reading, now_us
from sensormine.settings import Settings, get_settings
from sensormine.validation import validate_message

log = logging.getLogger("sensormine.ingest.consumer")


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


class HotStoreConsumer:
    """Consumes every tenant's telemetry topic into the hot store."""

    def __init__(self, settings: Settings | None = None, group_id: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.group_id = group_id or self.settings.consumer_group
        self.conn = connect(self.settings)
        migrate(self.conn)
        self.writer = HotStoreWriter(self.conn, self.group_id)
        self.dlq = make_producer(self.settings, **{"linger.ms": 5})
        self.consumer: Consumer = make_consumer(self.group_id, self.settings)
        self.stats = ConsumerStats()
        self.assigned = threading.Event()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The database, not Kafka, knows what has been written: resume from there.
        offsets = stored_offsets(self.conn, self.group_id)
        self.conn.commit()
        for tp in partitions:
            tp.offset = offsets.get((tp.topic, tp.partition), OFFSET_BEGINNING)
        consumer.assign(partitions)
        self.assigned.set()
        log.info("assigned %s", [(tp.topic, tp.partition, tp.offset) for tp in partitions])

    def _reject(self, msg: Message, reason: str) -> None:
        self.stats.rejected += 1
        key = msg.key()
        headers = dlq_headers("consumer", f"{msg.topic()}[{msg.partition()}]@{msg.offset()}", reason, None, key.decode() if key else None)
        self.dlq.produce(self.settings.dlq_topic, value=msg.value(), key=key, headers=headers)

    def process(self, messages: list[Message]) -> int:
        """Validate and write one batch of messages; returns readings inserted."""
        readings: list[Reading] = []
        offsets: dict[tuple[str, int], int] = {}
        now = now_us()
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("Kafka error: %s", err)
                continue
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            self.stats.messages += 1
            try:
                batch = decode_envelope(msg.value())
            except PayloadError as exc:
                self._reject(msg, str(exc))
                continue
            reason = validate_message(batch, self.settings, now)
            if reason is not None:
                self._reject(msg, reason)
                continue
            readings.extend(batch)
        if not offsets:
            return 0
        if self.stats.rejected:
            # Dead letters must be durable before the offsets that skip them are committed.
            self.dlq.flush(30)
        result = self.writer.write(readings, [KafkaOffset(t, p, o) for (t, p), o in offsets.items()])
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True
        )  # informational only (lag dashboards); the database holds the truth
        self.stats.readings += len(readings)
        self.stats.inserted += result.inserted
        self.stats.duplicates += result.duplicates
        self.stats.batches += 1
        self.stats.last_commit_at = time.monotonic()
        return result.inserted

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> ConsumerStats:
        """Consume until `stop` is set (or, with `idle_exit_s`, until no message came for that long)."""
        self.consumer.subscribe([self.settings.telemetry_topic_pattern], on_assign=self._on_assign)
        batch_target = self.settings.consumer_batch_size
        max_wait = self.settings.consumer_batch_ms / 1000
        last_message = time.monotonic()
        while not stop.is_set():
            pending: list[Message] = []
            deadline = time.monotonic() + max_wait
            while len(pending) < batch_target and time.monotonic() < deadline:
                got = self.consumer.consume(num_messages=min(10_000, batch_target), timeout=max(0.0, deadline - time.monotonic()))
                if not got:
                    break
                if self.stats.first_message_at is None:
                    self.stats.first_message_at = time.monotonic()
                pending.extend(got)
            if pending:
                last_message = time.monotonic()
                self.process(pending)
            elif idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
                break
        return self.stats

    def close(self) -> None:
        """Leave the group and close connections."""
        self.consumer.close()
        self.dlq.flush(30)
        self.conn.close()


def main() -> None:
    """Run the consumer until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    consumer = HotStoreConsumer()
    reporter = threading.Thread(target=_report, args=(consumer, stop), daemon=True)
    reporter.start()
    try:
        consumer.run(stop)
    finally:
        consumer.close()


def _report(consumer: HotStoreConsumer, stop: threading.Event) -> None:
    while not stop.wait(10):
        s = consumer.stats
        log.info("messages=%d readings=%d inserted=%d duplicates=%d rejected=%d", s.messages, s.readings, s.inserted, s.duplicates, s.rejected)


if __name__ == "__main__":
    main()
