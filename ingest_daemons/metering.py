"""Kafka `{env}.metering.events` → usage ledger: the metering consumer (docs/billing.md, "Usage events").

Each batch is stored in one transaction (`store_usage_events`: an event id already stored is
skipped), then its offsets are committed to Kafka. A crash in between redelivers the batch, and the
event ids make the second delivery count nothing: at-least-once delivery, exactly-once counting.
A message that is not a usage event goes to `{env}.dlq` with its reason, unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import cast

from confluent_kafka import KafkaError, Message, TopicPartition

from ingest_daemons.runner import run_restarting, stop_on_signals
from sensormine.clients.kafka import ensure_topics, make_consumer, make_producer
from sensormine.clients.postgres import METERING, connect, migrate_database
from sensormine.ingest.sinks import dlq_headers
from sensormine.metering.usage_events import UsageEvent, UsageEventError, store_usage_events
from sensormine.settings import Settings, get_settings

log = logging.getLogger("sensormine.ingest.metering")
SOURCE = "metering"
_JOIN_GRACE_S = 60.0  # a slow group join (busy machine) must not count as an idle topic


@dataclass
class MeteringStats:
    """Counters since start."""

    messages: int = 0
    stored: int = 0  # events new to the ledger
    replayed: int = 0  # events whose id was already stored
    rejected: int = 0


class MeteringConsumer:
    """One member of the `{env}.metering` consumer group."""

    def __init__(self, settings: Settings | None = None, group_id: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.group_id = group_id or f"{self.settings.env}.metering"
        migrate_database(self.settings)
        ensure_topics([self.settings.metering_topic, self.settings.dlq_topic], settings=self.settings)
        self.conn = connect(self.settings, role=METERING)
        self.dlq = make_producer(self.settings, **{"linger.ms": 5})
        self.consumer = make_consumer(self.group_id, self.settings)
        self.stats = MeteringStats()
        self.assigned = threading.Event()

    def process(self, messages: list[Message]) -> int:
        """Store one batch and commit its offsets; returns the events new to the ledger."""
        events: list[UsageEvent] = []
        rejected = self.stats.rejected
        offsets: dict[tuple[str, int], int] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("Kafka error: %s", err)
                continue
            offsets[(cast(str, msg.topic()), cast(int, msg.partition()))] = cast(int, msg.offset()) + 1
            self.stats.messages += 1
            try:
                events.append(UsageEvent.from_json(msg.value()))
            except UsageEventError as exc:
                self._reject(msg, f"not a usage event: {exc}")
        if not offsets:
            return 0
        if self.stats.rejected != rejected:
            self.dlq.flush(30)  # dead letters durable before the offsets that skip them
        unique = list({e.event_id: e for e in events}.values())  # a batch may carry an event twice
        with self.conn.transaction():
            new = store_usage_events(self.conn, unique)
        self.stats.stored += new
        self.stats.replayed += len(events) - new
        self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
        return new

    def _reject(self, msg: Message, reason: str) -> None:
        self.stats.rejected += 1
        origin = f"kafka:{msg.topic()}/{msg.partition()}@{msg.offset()}"
        headers = dlq_headers(SOURCE, origin, reason, None, None)
        self.dlq.produce(self.settings.dlq_topic, msg.value() or b"", msg.key(), headers=headers)

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> MeteringStats:
        """Consume until `stop` is set (or, with `idle_exit_s`, until no message came for that long)."""
        self.consumer.subscribe([self.settings.metering_topic], on_assign=lambda *_: self.assigned.set())
        last_message = started = time.monotonic()
        while not stop.is_set():
            got = self.consumer.consume(num_messages=5_000, timeout=0.5)
            if got:
                last_message = time.monotonic()
                self.process(got)
            elif not self.assigned.is_set() and time.monotonic() - started < _JOIN_GRACE_S:
                last_message = time.monotonic()  # idle time counts from joining the group, not from start
            elif idle_exit_s is not None and time.monotonic() - last_message > idle_exit_s:
                break
        return self.stats

    def close(self) -> None:
        """Leave the group and close connections."""
        self.consumer.close()
        self.dlq.flush(30)
        self.conn.close()


def run_forever(stop: threading.Event, settings: Settings | None = None, max_backoff_s: float = 30.0) -> None:
    """Consume until `stop`, starting over after any failure with backoff (safe: ids dedupe a replay)."""
    run_restarting(stop, lambda: MeteringConsumer(settings), "metering consumer", _log_stats, max_backoff_s)


def _log_stats(consumer: MeteringConsumer, prefix: str) -> None:
    s = consumer.stats
    log.info("%smessages=%d stored=%d replayed=%d rejected=%d", prefix, s.messages, s.stored, s.replayed, s.rejected)


def main() -> None:
    """Run the metering consumer until SIGTERM/SIGINT."""
    run_forever(stop_on_signals())


if __name__ == "__main__":
    main()
