"""The stream processor: alarm rules on the live telemetry topics, in its own consumer group.

It reads every tenant's `{env}.{tenant}.telemetry` topic apart from the hot-store consumer (group
`alerts_group`), so it scales by partitions and never slows storage. Each batch of messages is
decoded and folded into tumbling windows per device x metric (`sensormine.alerts.windows`; closed
windows go to `{env}.{tenant}.aggregates`, keyed `{device}/{metric}/{window start}`); it is then
evaluated (`sensormine.alerts.processor.AlarmProcessor`: the transitions are written in one
transaction), the raised and cleared alarms are published to `{env}.{tenant}.alerts`, and only
then are the batch's offsets committed to Kafka. A crash therefore replays at most the last batch;
the alarm store drops what it has already seen (transition ids, last-update times), so a replay
changes nothing. On start the evaluator restores the open alarms and replays the recent hot store
to rebuild its state (`AlarmProcessor.warm_up`). What a restart loses is the open aggregate
windows: those of the moment of a crash are published incomplete or not at all, and a replayed
batch can publish a window again under the same key, so consumers keep the last message per key. An alarm event
whose publication Kafka does not confirm is logged, not retried: the store has the alarm, but the
topic misses that event (an outbox over `alarm_events` would close this gap). docs/alerts.md.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import orjson
from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from ingest_daemons.runner import stop_on_signals
from sensormine.alerts.processor import AlarmProcessor, start_processor
from sensormine.alerts.store import AlarmChange
from sensormine.alerts.windows import TumblingWindows, WindowAggregate
from sensormine.clients.kafka import ensure_topics, make_consumer, make_producer
from sensormine.clients.postgres import migrate_database
from sensormine.reading import Reading
from sensormine.settings import Settings, get_settings
from sensormine.telemetry.payload import PayloadError, decode_envelope

log = logging.getLogger("sensormine.alerts.streamproc")


@dataclass
class StreamStats:
    """Counters since start."""

    messages: int = 0
    readings: int = 0
    undecodable: int = 0
    raised: int = 0
    cleared: int = 0
    published: int = 0
    aggregates: int = 0


def alarm_event(change: AlarmChange, device: tuple[str | None, dict] | None = None) -> bytes:
    """The `{env}.{tenant}.alerts` message of one alarm change (key: the alarm id), with the device's
    type and labels from the registry (`device`: (device_type, metadata))."""
    a = change.alarm
    kind, labels = device or (None, {})
    at = a.cleared_at if change.kind == "cleared" and a.cleared_at is not None else a.raised_at
    return orjson.dumps(
        {
            "event": f"alarm.{change.kind}",
            "id": f"{a.id}/{change.kind}/{at.isoformat()}",  # the same for a re-published event
            "alarm_id": a.id,
            "tenant_id": a.tenant_id,
            "device_id": a.device_id,
            "device_type": kind,
            "labels": labels,
            "rule_tenant_id": a.rule_tenant_id,
            "rule_id": a.rule_id,
            "rule_name": a.rule_name,
            "severity": a.severity,
            "condition": a.condition_text,
            "metric": a.metric,
            "value": a.last_value,
            "status": a.status,
            "raised_at": a.raised_at.isoformat(),
            "cleared_at": a.cleared_at.isoformat() if a.cleared_at else None,
        }
    )


class StreamProcessor:
    """One member of the alerts consumer group."""

    def __init__(self, settings: Settings | None = None, processor: AlarmProcessor | None = None) -> None:
        self.settings = settings or get_settings()
        migrate_database(self.settings)
        self.processor = processor or start_processor(self.settings)
        self.consumer = make_consumer(self.settings.alerts_group, self.settings)
        self.producer: Producer = make_producer(self.settings, **{"linger.ms": 5})
        self.stats = StreamStats()
        self.windows = TumblingWindows(self.settings.aggregate_window_s, self.settings.aggregate_grace_s)
        self.assigned = threading.Event()
        self._topics: set[str] = set()

    def _ensure(self, topics: set[str]) -> None:
        new = topics - self._topics
        if new:
            ensure_topics(sorted(new), settings=self.settings)
            self._topics |= new

    def _publish_aggregates(self, aggregates: list[WindowAggregate]) -> None:
        """Closed windows to the aggregates topics (confirmed with the alarm events' flush)."""
        self._ensure({self.settings.aggregates_topic(a.tenant_id) for a in aggregates})

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.error("a window aggregate was not delivered: %s", err)
            else:
                self.stats.aggregates += 1

        for a in aggregates:
            self.producer.produce(
                self.settings.aggregates_topic(a.tenant_id),
                orjson.dumps(a.as_json()),
                key=f"{a.device_id}/{a.metric}/{a.start_us}",
                on_delivery=delivered,
            )

    def _publish(self, changes: list[AlarmChange]) -> None:
        self._ensure({self.settings.alerts_topic(c.alarm.tenant_id) for c in changes})
        failed: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failed.append(err)

        for c in changes:
            self.producer.produce(
                self.settings.alerts_topic(c.alarm.tenant_id),
                alarm_event(c, self.processor.directory.devices.get((c.alarm.tenant_id, c.alarm.device_id))),
                key=c.alarm.id,
                on_delivery=delivered,
            )
        left = self.producer.flush(30)
        if left or failed:
            log.error(
                "%d alarm event(s) not confirmed by Kafka (errors %s); the alarms are stored",
                left + len(failed),
                failed[:3],
            )
        self.stats.published += len(changes) - left - len(failed)

    def process(self, messages: list[Message]) -> list[AlarmChange]:
        """Evaluate one batch; publish its alarm changes; commit its offsets."""
        readings: list[Reading] = []
        for msg in messages:
            if msg.error() is not None:
                continue
            self.stats.messages += 1
            try:
                readings += decode_envelope(msg.value() or b"")
            except PayloadError:
                self.stats.undecodable += 1  # the hot-store consumer dead-letters it
        self.stats.readings += len(readings)
        closed = self.windows.add(readings)
        if closed:
            self._publish_aggregates(closed)
        changes = self.processor.process(readings) if readings else []
        if changes:
            self.stats.raised += sum(c.kind == "raised" for c in changes)
            self.stats.cleared += sum(c.kind == "cleared" for c in changes)
            self._publish(changes)
        elif closed:
            self.producer.flush(30)
        done: dict[tuple[str, int], int] = {}
        for msg in messages:
            if msg.error() is None:
                key = (msg.topic() or "", msg.partition() or 0)
                done[key] = max(done.get(key, 0), (msg.offset() or 0) + 1)
        if done:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()], asynchronous=False)
        return changes

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> StreamStats:
        """Consume until `stop` (or, with `idle_exit_s`, until no message came for that long)."""
        self.consumer.subscribe([self.settings.telemetry_topic_pattern], on_assign=lambda c, p: self.assigned.set())
        last = time.monotonic()
        while not stop.is_set():
            got = self.consumer.consume(num_messages=5_000, timeout=0.2)
            if got:
                last = time.monotonic()
                self.process(got)
            elif idle_exit_s is not None and self.assigned.is_set() and time.monotonic() - last > idle_exit_s:
                break
        return self.stats

    def close(self) -> None:
        """Publish the windows still open, leave the group, stop the processor (ticks, notifications)."""
        last = self.windows.flush()
        if last:
            self._publish_aggregates(last)
        self.consumer.close()
        self.producer.flush(30)
        self.processor.close()


def run_forever(stop: threading.Event, settings: Settings | None = None, max_backoff_s: float = 30.0) -> None:
    """Process until `stop`, starting over after any failure with backoff (the group resumes from Kafka)."""
    backoff = 1.0
    while not stop.is_set():
        proc: StreamProcessor | None = None
        try:
            proc = StreamProcessor(settings)
            proc.run(stop)
            backoff = 1.0
        except Exception as exc:
            log.error("stream processor failed (%s: %s); starting over in %.0f s", type(exc).__name__, exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff_s)
        finally:
            if proc is not None:
                log.info("stopped: %s", proc.stats)
                try:
                    proc.close()
                except Exception as exc:
                    log.warning("closing the failed stream processor: %s", exc)


def main() -> None:
    """Run the stream processor until SIGTERM/SIGINT."""
    run_forever(stop_on_signals())


if __name__ == "__main__":
    main()
