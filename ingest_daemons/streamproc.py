"""The stream processor: alarm rules on the live telemetry topics, in its own consumer group.

It reads every tenant's `{env}.{tenant}.telemetry` topic apart from the hot-store consumer (group
`alerts_group`), so it scales by partitions and never slows storage. Each batch of messages is
decoded and folded into tumbling or sliding windows per device x metric (`sensormine.alerts.windows`;
closed windows go to `{env}.{tenant}.aggregates`, keyed by the window's id, with the device's name,
type and labels); it is then evaluated (`sensormine.alerts.processor.AlarmProcessor`: the
transitions are written in one transaction), the raised and cleared alarms are published to
`{env}.{tenant}.alerts`, and only then are the batch's offsets committed to Kafka. A crash
therefore replays at most the last batch; the alarm store drops what it has already seen
(transition ids, last-update times) and the windows what they already hold, so a replay changes
nothing.

State is rebuilt from the hot store, per partition, whenever partitions are assigned (on start and
in a rebalance; `StreamProcessor.rebuild`): the open alarms are restored, the recent readings of the
partitions' devices replayed into the evaluator and the windows. A revoked partition's open windows
are dropped for its new owner to rebuild; open windows are not published at shutdown either. What
this group handled but the hot store does not hold yet (its consumer behind, or down) is read back
from the telemetry topics themselves, from the hot-store consumer's stored offsets up to this
group's committed ones; so the rebuild neither loses nor repeats a window
(`sensormine.alerts.windows`), whether or not the hot-store consumer is running. Every raise and clear is queued in
`alarm_outbox` in the transaction that writes it and taken off when Kafka confirms its event; what
stays there (Kafka refused it, or the process died in between) is published again after
`alerts_outbox_retry_s` by whichever member sweeps first, so an event reaches the topic at least once
(consumers dedupe by its `id`).
docs/alerts.md and docs/decisions.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from ingest_daemons.runner import CollectBetweenBatches, run_restarting, stop_on_signals
from sensormine.alerts.processor import AlarmProcessor, recent_readings, start_processor
from sensormine.alerts.store import AlarmChange
from sensormine.alerts.windows import WindowAggregate, Windows
from sensormine.clients.hotstore import stored_offsets
from sensormine.clients.kafka import ensure_topics, make_consumer, make_producer, partition_of
from sensormine.clients.postgres import ALERTS, connect, migrate_database
from sensormine.reading import Reading, now_us
from sensormine.schemas.validation import SchemaDirectory
from sensormine.settings import Settings, get_settings
from sensormine.telemetry.payload import PayloadError, decode_envelope
from sensormine.telemetry.validation import validate_message

log = logging.getLogger("sensormine.alerts.streamproc")

REBUILD_WAIT_S = 60.0  # how long a rebuild waits for Kafka to deliver what the hot store did not hold


@dataclass
class StreamStats:
    """Counters since start."""

    messages: int = 0
    readings: int = 0
    undecodable: int = 0
    rejected: int = 0  # valid envelopes the hot store would not accept (limits, schema): not evaluated
    raised: int = 0
    cleared: int = 0
    published: int = 0
    aggregates: int = 0  # window aggregates produced, less those Kafka refused


def alarm_event(change: AlarmChange, device: dict[str, Any] | None = None) -> bytes:
    """The `{env}.{tenant}.alerts` message of one alarm change (key: the alarm id), with the device's
    name, type and labels from the registry (`device`: `Directory.describe`)."""
    a = change.alarm
    at = a.cleared_at if change.kind == "cleared" and a.cleared_at is not None else a.raised_at
    return orjson.dumps(
        {
            "event": f"alarm.{change.kind}",
            "id": f"{a.id}/{change.kind}/{at.isoformat()}",  # the same for a re-published event
            "alarm_id": a.id,
            "tenant_id": a.tenant_id,
            "device_id": a.device_id,
            **(device or {"device_name": None, "device_type": None, "labels": {}}),
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
        self.processor = processor or start_processor(self.settings, warm_up=False)
        self.processor.outbox = True  # every raise and clear is queued until Kafka confirms its event
        self._swept = time.monotonic()
        self.schemas = SchemaDirectory(lambda: connect(self.settings, role=ALERTS))
        self.schemas.refresh()
        self.consumer = make_consumer(self.settings.alerts_group, self.settings)
        self.producer: Producer = make_producer(self.settings, **{"linger.ms": 5})
        # Window aggregates outnumber alarm events by far: their producer reports failed deliveries
        # only (a Python callback per confirmed aggregate cost more than producing it).
        self.aggregates_producer: Producer = make_producer(self.settings, **{"delivery.report.only.error": True})
        self.stats = StreamStats()
        self.windows = Windows(
            self.settings.aggregate_window_s, self.settings.aggregate_grace_s, self.settings.aggregate_slide_s
        )
        self.assigned = threading.Event()
        self._topics: set[str] = set()
        self._owned: set[tuple[str, int]] = set()  # (topic, partition) assigned to this member
        self._unbuilt: set[tuple[str, int]] = set()  # assigned, state not yet rebuilt from the hot store
        self._partitions: dict[str, int] = {}  # topic -> partition count

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        got = {(tp.topic, tp.partition) for tp in partitions}
        self._unbuilt |= got - self._owned
        self._owned |= got
        self.assigned.set()

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Offsets are committed after every batch, so nothing handled is left uncommitted here.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._owned -= lost
        self._unbuilt -= lost
        # No metadata request inside a rebalance callback: partition counts come from the cache that
        # `rebuild` filled; a topic not in it had nothing handled yet.
        dropped = self.windows.forget(
            lambda series: (
                self.settings.telemetry_topic(series[0]) in self._partitions
                and self._home(series[0], series[1]) in lost
            )
        )
        log.info("partitions revoked: %s; %d series' open windows left to their new owner", sorted(lost), dropped)

    def _home(self, tenant_id: str, device_id: str) -> tuple[str, int]:
        """The (topic, partition) a device's readings travel on (the sinks key them by device id)."""
        topic = self.settings.telemetry_topic(tenant_id)
        return topic, partition_of(device_id.encode(), self._partitions[topic])

    def _hot_store_gaps(self, parts: set[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        """Per partition of `parts`, the offsets this group has handled but the hot store may not hold
        yet: from the hot-store consumer's stored offset up to this group's committed one (read before
        the hot store is, so a row written meanwhile is replayed twice at worst, never missed)."""
        committed = {
            (tp.topic, tp.partition): tp.offset
            for tp in self.consumer.committed([TopicPartition(t, p) for t, p in sorted(parts)], timeout=10)
            if tp.offset >= 0
        }
        with connect(self.settings, role=ALERTS) as conn:
            stored = stored_offsets(conn, self.settings.consumer_group)
        return {k: (stored.get(k, 0), o) for k, o in committed.items() if stored.get(k, 0) < o}

    def _replay(self, readings: list[Reading], floor_us: int) -> None:
        """Readings handled before this member owned their partitions, into the windows and the evaluator."""
        self.windows.add(readings, floor_us=floor_us, replay=True)
        if readings:
            self._publish(self.processor.process(readings))

    def _replay_from_kafka(self, gaps: dict[tuple[str, int], tuple[int, int]], floor_us: int) -> int:
        """Replay the gaps that the hot store did not cover (its consumer behind or down) from the
        telemetry topics themselves: a reader of its own, assigned, committing nothing. Readings older
        than `floor_us` are left out, as the hot store's replay leaves them out. Returns the readings."""
        reader = make_consumer(f"{self.settings.alerts_group}.rebuild", self.settings)
        replayed = 0
        try:
            todo: dict[tuple[str, int], int] = {}
            starts = []
            for (topic, part), (start, end) in sorted(gaps.items()):
                low, _ = reader.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
                if max(start, low) < end:
                    todo[(topic, part)] = end
                    starts.append(TopicPartition(topic, part, max(start, low)))
            reader.assign(starts)
            deadline = time.monotonic() + REBUILD_WAIT_S
            now = now_us()
            while todo:
                if time.monotonic() > deadline:
                    log.warning("rebuild: Kafka did not deliver offsets up to %s in %.0f s", todo, REBUILD_WAIT_S)
                    break
                batch: list[Reading] = []
                for msg in reader.consume(num_messages=5_000, timeout=0.5):
                    key = (msg.topic() or "", msg.partition() or 0)
                    upto = todo.get(key)
                    if msg.error() is not None or upto is None or (msg.offset() or 0) >= upto:
                        continue
                    if (msg.offset() or 0) + 1 >= upto:
                        del todo[key]
                    batch += [r for r in self._accepted(msg, now) if r.ts >= floor_us]
                self._replay(batch, floor_us)
                replayed += len(batch)
        finally:
            reader.close()
        return replayed

    def rebuild(self) -> int:
        """Rebuild the state of newly assigned partitions from the hot store (on start, and when a
        rebalance brings partitions): their devices' readings since the warm-up span go through the
        evaluator (`AlarmProcessor.warm_up`'s semantics: latches, durations and latest values come
        back, nothing stored changes twice) and into the windows from a window boundary on, so the
        open windows are whole again. Messages this group handled that the hot store does not hold
        yet are replayed after it from Kafka (`_replay_from_kafka`). Kafka then redelivers from the
        committed offsets; what the replay already covered is recognised (late for the evaluator,
        duplicates for the windows). Returns the readings replayed."""
        parts, self._unbuilt = self._unbuilt, set()
        for topic in {t for t, _ in parts} - set(self._partitions):
            self._partitions[topic] = len(self.consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        if not parts or self.settings.alerts_warmup_s <= 0:
            return 0
        tenants = sorted({self.settings.tenant_of_telemetry_topic(t) or "" for t, _ in parts})
        width = self.windows.width_us
        since_us = int(self.processor.replay_since(self.settings.alerts_warmup_s) * 1_000_000)
        since_us -= since_us % width
        replayed = 0
        gaps = self._hot_store_gaps(parts)
        since = datetime.fromtimestamp(since_us / 1_000_000, UTC)
        for batch in recent_readings(lambda: connect(self.settings, role=ALERTS), since, tenants=tenants):
            mine = [r for r in batch if self._home(r.tenant_id, r.device_id) in parts]
            self._replay(mine, since_us)
            replayed += len(mine)
        from_kafka = self._replay_from_kafka(gaps, since_us) if gaps else 0
        self.producer.flush(30)
        log.info(
            "state of %d partition(s) rebuilt from %d readings of the hot store and %d from Kafka "
            "(messages the hot store did not hold yet: %d)",
            len(parts),
            replayed,
            from_kafka,
            sum(end - start for start, end in gaps.values()),
        )
        return replayed + from_kafka

    def _ensure(self, topics: set[str]) -> None:
        new = topics - self._topics
        if new:
            ensure_topics(sorted(new), settings=self.settings)
            self._topics |= new

    def _publish_aggregates(self, aggregates: list[WindowAggregate]) -> None:
        """Closed windows to the aggregates topics (confirmed with the alarm events' flush)."""
        topics = {t: self.settings.aggregates_topic(t) for t in {a.tenant_id for a in aggregates}}
        self._ensure(set(topics.values()))

        def failed(err: KafkaError | None, _msg: Message) -> None:  # called for failed deliveries only
            log.error("a window aggregate was not delivered: %s", err)
            self.stats.aggregates -= 1

        describe, produce, dumps = (
            self.processor.directory.describe_json,
            self.aggregates_producer.produce,
            orjson.dumps,
        )
        for a in aggregates:
            # The window's fields, then the device's (the same bytes for every window of the device).
            body = dumps(a)[:-1] + describe(a.tenant_id, a.device_id)
            produce(topics[a.tenant_id], body, key=a.id, on_delivery=failed)
        self.stats.aggregates += len(aggregates)

    def _publish(self, changes: list[AlarmChange], count: bool = True) -> None:
        if not changes:
            return
        if count:
            self.stats.raised += sum(c.kind == "raised" for c in changes)
            self.stats.cleared += sum(c.kind == "cleared" for c in changes)
        self._ensure({self.settings.alerts_topic(c.alarm.tenant_id) for c in changes})
        failed: list[KafkaError] = []

        confirmed: list[AlarmChange] = []

        def delivered(change: AlarmChange) -> Callable[[KafkaError | None, Message], None]:
            def done(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    confirmed.append(change)
                else:
                    failed.append(err)

            return done

        for c in changes:
            self.producer.produce(
                self.settings.alerts_topic(c.alarm.tenant_id),
                alarm_event(c, self.processor.directory.describe(c.alarm.tenant_id, c.alarm.device_id)),
                key=c.alarm.id,
                on_delivery=delivered(c),
            )
        left = self.producer.flush(30)
        if left or failed:
            log.error(
                "%d alarm event(s) not confirmed by Kafka (errors %s); they stay in the outbox and go out again "
                "in %.0f s",
                left + len(failed),
                failed[:3],
                self.settings.alerts_outbox_retry_s,
            )
        self.processor.outbox_done(confirmed)
        self.stats.published += len(confirmed)

    def sweep_outbox(self) -> int:
        """Publish again the alarm events queued longer than `alerts_outbox_retry_s` and never confirmed
        (Kafka refused them, or a process died between its commit and Kafka's confirmation)."""
        self._swept = time.monotonic()
        due = self.processor.outbox_due(self.settings.alerts_outbox_retry_s)
        if due:
            log.info("publishing %d alarm event(s) again from the outbox", len(due))
            self._publish(due, count=False)
        return len(due)

    def _rejected(self, decoded: list[Reading], now: int) -> bool:
        """Whether the hot-store consumer dead-letters this message (`validate_message`, then the device
        type's latest schema, reloaded once before a verdict against it): its readings raise nothing."""
        if validate_message(decoded, self.settings, now) is not None:
            return True
        r = decoded[0]  # an envelope is one device's
        if self.schemas.for_device(r.tenant_id, r.device_id) is None:
            return False
        if self.schemas.check(r.tenant_id, r.device_id, decoded) is None:
            return False
        return not (
            self.schemas.refresh_if_older(1.0) and self.schemas.check(r.tenant_id, r.device_id, decoded) is None
        )

    def _accepted(self, msg: Message, now: int, stats: StreamStats | None = None) -> list[Reading]:
        """The readings of a message the hot store accepts; none for one it dead-letters (undecodable, or
        `_rejected`), counted in `stats` when given."""
        try:
            decoded = decode_envelope(msg.value() or b"")
        except PayloadError:
            if stats is not None:
                stats.undecodable += 1  # the hot-store consumer dead-letters it
            return []
        if self._rejected(decoded, now):
            if stats is not None:
                stats.rejected += 1
            return []
        return decoded

    def process(self, messages: list[Message]) -> list[AlarmChange]:
        """Evaluate one batch; publish its alarm changes; commit its offsets."""
        readings: list[Reading] = []
        if self.schemas.due():
            self.schemas.refresh()
        now = now_us()
        for msg in messages:
            if msg.error() is not None:
                continue
            self.stats.messages += 1
            readings += self._accepted(msg, now, self.stats)
        self.stats.readings += len(readings)
        closed = self.windows.add(readings)
        if closed:
            self._publish_aggregates(closed)
        changes = self.processor.process(readings) if readings else []
        if changes:
            self._publish(changes)
        if closed:
            self.aggregates_producer.flush(30)
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
        self.consumer.subscribe(
            [self.settings.telemetry_topic_pattern], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        last = time.monotonic()
        with CollectBetweenBatches() as gc:
            while not stop.is_set():
                got = self.consumer.consume(num_messages=5_000, timeout=0.2)
                if self._unbuilt:
                    self.rebuild()
                if time.monotonic() - self._swept >= self.settings.alerts_outbox_retry_s:
                    self.sweep_outbox()
                if got:
                    last = time.monotonic()
                    self.process(got)
                    gc.between_batches()
                elif idle_exit_s is not None and self.assigned.is_set() and time.monotonic() - last > idle_exit_s:
                    break
        return self.stats

    def close(self) -> None:
        """Leave the group and stop the processor (ticks, notifications). Open windows are not published:
        whoever owns their partitions next rebuilds them from the hot store and closes them whole."""
        self.consumer.close()
        self.producer.flush(30)
        self.aggregates_producer.flush(30)
        self.processor.close()


def run_forever(stop: threading.Event, settings: Settings | None = None, max_backoff_s: float = 30.0) -> None:
    """Process until `stop`, starting over after any failure with backoff (the group resumes from Kafka)."""
    run_restarting(stop, lambda: StreamProcessor(settings), "stream processor", _log_stats, max_backoff_s)


def _log_stats(proc: StreamProcessor, prefix: str) -> None:
    log.info("%s%s", prefix, proc.stats)


def main() -> None:
    """Run the stream processor until SIGTERM/SIGINT."""
    run_forever(stop_on_signals())


if __name__ == "__main__":
    main()
