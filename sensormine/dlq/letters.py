"""Dead letters: rejected messages in Kafka ({env}.dlq) or the dead_letters table, listed and fetched by id."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from sensormine.clients.kafka import make_consumer
from sensormine.reading import us_to_datetime
from sensormine.settings import Settings

log = logging.getLogger(__name__)


DB_PREFIX = "dead_letters/"


KAFKA_TIMEOUT_S = 30.0


MAX_LIMIT = 10_000


Status = Literal["pending", "replayed", "all"]


class DlqError(RuntimeError):
    """The dead-letter queue cannot be read or replayed right now (Kafka timeout, lock held)."""


@dataclass(frozen=True)
class DeadLetter:
    """One rejected message: where it is, why it was rejected, and its original bytes."""

    id: str
    source: str
    origin: str | None
    reason: str
    tenant_id: str | None
    device_id: str | None
    rejected_at: datetime | None
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    replayed_at: datetime | None = None

    @property
    def status(self) -> Literal["pending", "replayed"]:
        """`replayed` once its readings were re-submitted, else `pending`."""
        return "pending" if self.replayed_at is None else "replayed"


@dataclass(frozen=True)
class DlqFilter:
    """Which dead letters to list or replay. `tenant_ids` None means any (an operator); the API passes
    the caller's visible tenants, which also hides dead letters that name no tenant."""

    tenant_ids: frozenset[str] | None = None
    device_id: str | None = None
    source: str | None = None
    reason: str | None = None  # substring, case-insensitive
    since: datetime | None = None
    status: Status = "all"
    limit: int = 100

    def matches(self, entry: DeadLetter) -> bool:
        """Whether a dead letter passes every filter."""
        return (
            (self.tenant_ids is None or entry.tenant_id in self.tenant_ids)
            and (self.device_id is None or entry.device_id == self.device_id)
            and (self.source is None or entry.source == self.source)
            and (self.reason is None or self.reason.lower() in entry.reason.lower())
            and (self.since is None or (entry.rejected_at is not None and entry.rejected_at >= self.since))
            and (self.status == "all" or entry.status == self.status)
        )


def kafka_id(topic: str, partition: int, offset: int) -> str:
    """Id of a dead letter in the DLQ topic."""
    return f"{topic}/{partition}/{offset}"


def parse_id(dead_letter_id: str, settings: Settings) -> tuple[int, int] | int | None:
    """(partition, offset) of a DLQ-topic id, the row id of a `dead_letters/<n>` id, or None.

    Only this environment's DLQ topic is accepted: an id cannot make the reader open another topic.
    """
    if dead_letter_id.startswith(DB_PREFIX):
        number = dead_letter_id[len(DB_PREFIX) :]
        return int(number) if number.isascii() and number.isdigit() and len(number) < 19 else None
    topic, _, rest = dead_letter_id.partition("/")
    partition, _, offset = rest.partition("/")
    numbers = partition + offset
    if topic != settings.dlq_topic or not (numbers.isascii() and partition.isdigit() and offset.isdigit()):
        return None
    if len(offset) > 18:
        return None
    return int(partition), int(offset)


def _headers(msg: Message) -> dict[str, str]:
    found = msg.headers() or []
    pairs = list(found.items()) if isinstance(found, dict) else found
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in pairs if v is not None}


def _from_message(msg: Message, settings: Settings, replayed: dict[tuple[int, int], datetime]) -> DeadLetter:
    headers = _headers(msg)
    partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
    origin = headers.get("origin")
    key = msg.key()
    tenant = headers.get("tenant_id")
    if tenant is None and origin and "[" in origin:  # a consumer reject from before it named the tenant
        tenant = settings.tenant_of_telemetry_topic(origin.split("[", 1)[0])
    device = headers.get("device_id") or (key.decode("utf-8", "replace") if key else None)
    stamp = headers.get("rejected_at_us", "")
    if stamp.isascii() and stamp.isdigit():
        rejected_at: datetime | None = us_to_datetime(int(stamp))
    else:
        kind, ms = msg.timestamp()
        rejected_at = datetime.fromtimestamp(ms / 1000, UTC) if kind and ms > 0 else None
    return DeadLetter(
        id=kafka_id(settings.dlq_topic, partition, offset),
        source=headers.get("source", "unknown"),
        origin=origin,
        reason=headers.get("reason", ""),
        tenant_id=tenant,
        device_id=device,
        rejected_at=rejected_at,
        payload=msg.value() or b"",
        headers=headers,
        replayed_at=replayed.get((partition, offset)),
    )


@contextmanager
def _reader(settings: Settings) -> Iterator[Consumer]:
    """A consumer that reads the DLQ topic by assignment: it joins no group and commits nothing."""
    consumer = make_consumer(
        f"sensormine-dlq-reader-{uuid.uuid4().hex[:12]}", settings, **{"enable.partition.eof": True}
    )
    try:
        yield consumer
    finally:
        consumer.close()


def _partitions(consumer: Consumer, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=KAFKA_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None:
        return []  # no dead letter yet: the topic is created with the first one
    return sorted(meta.partitions)


def _scan(
    consumer: Consumer, topic: str, ranges: dict[int, tuple[int, int]], keep: Callable[[Message], bool], limit: int
) -> list[Message]:
    """Messages in [start, end) of each partition that `keep` accepts, at most `limit` per partition."""
    todo = {p: r for p, r in ranges.items() if r[0] < r[1]}
    if not todo:
        return []
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
    kept: list[Message] = []
    per_partition = dict.fromkeys(todo, 0)
    deadline = time.monotonic() + KAFKA_TIMEOUT_S

    def done(partition: int) -> None:
        if todo.pop(partition, None) is not None:
            consumer.pause([TopicPartition(topic, partition)])

    while todo:
        if time.monotonic() > deadline:
            raise DlqError(
                f"reading {topic} stalled for {KAFKA_TIMEOUT_S:.0f} s (partitions {sorted(todo)} unfinished)"
            )
        batch = consumer.consume(1000, timeout=0.5)
        if batch:
            deadline = time.monotonic() + KAFKA_TIMEOUT_S  # a long DLQ may take a while: only a stall fails
        for msg in batch:
            partition = msg.partition()
            if partition is None or partition not in todo:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    done(partition)
                else:
                    log.warning("reading %s: %s", topic, err)
                continue
            offset = int(msg.offset() or 0)
            end = todo[partition][1]
            if offset >= end:
                done(partition)
                continue
            if keep(msg):
                kept.append(msg)
                per_partition[partition] += 1
                if per_partition[partition] >= limit:
                    done(partition)
                    continue
            if offset + 1 >= end:
                done(partition)
    return kept


def _replayed_kafka(conn: psycopg.Connection, topic: str) -> dict[tuple[int, int], datetime]:
    rows = conn.execute(
        "SELECT kafka_partition, kafka_offset, replayed_at FROM dlq_replays WHERE dlq_topic = %s", (topic,)
    ).fetchall()
    return {(int(p), int(o)): at for p, o, at in rows}


def _kafka_list(conn: psycopg.Connection, settings: Settings, flt: DlqFilter) -> list[DeadLetter]:
    topic = settings.dlq_topic
    replayed = _replayed_kafka(conn, topic)
    out: list[DeadLetter] = []

    def keep(msg: Message) -> bool:
        entry = _from_message(msg, settings, replayed)
        if flt.matches(entry):
            out.append(entry)
            return True
        return False

    with _reader(settings) as consumer:
        ranges: dict[int, tuple[int, int]] = {}
        for p in _partitions(consumer, topic):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=KAFKA_TIMEOUT_S)
            ranges[p] = (low, high)
        if flt.since is not None and ranges:
            ms = int(flt.since.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in ranges], timeout=KAFKA_TIMEOUT_S)
            for tp in found:
                low, high = ranges[tp.partition]
                ranges[tp.partition] = (high if tp.offset < 0 else max(low, tp.offset), high)
        # The oldest `limit` matches overall are among the first `limit` of each partition.
        _scan(consumer, topic, ranges, keep, flt.limit)
    return out


def _kafka_get(
    conn: psycopg.Connection, settings: Settings, positions: Collection[tuple[int, int]]
) -> list[DeadLetter]:
    topic = settings.dlq_topic
    wanted: dict[int, set[int]] = {}
    for p, o in positions:
        wanted.setdefault(p, set()).add(o)
    replayed = _replayed_kafka(conn, topic)
    with _reader(settings) as consumer:
        partitions = set(_partitions(consumer, topic))
        ranges: dict[int, tuple[int, int]] = {}
        for p, offsets in wanted.items():
            if p not in partitions:
                continue
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=KAFKA_TIMEOUT_S)
            ranges[p] = (max(low, min(offsets)), min(high, max(offsets) + 1))
        found = _scan(
            consumer, topic, ranges, lambda m: int(m.offset() or 0) in wanted[int(m.partition() or 0)], MAX_LIMIT
        )
    return [_from_message(m, settings, replayed) for m in found]


_DB_COLUMNS = (
    "SELECT d.id, d.received_at, d.source, d.origin, d.tenant_id, d.device_id, d.reason, d.payload, r.replayed_at "
    "FROM dead_letters d LEFT JOIN dlq_replays r ON r.dead_letter_id = d.id "
)


def _from_row(row: tuple[Any, ...]) -> DeadLetter:
    row_id, received_at, source, origin, tenant_id, device_id, reason, payload, replayed_at = row
    return DeadLetter(
        f"{DB_PREFIX}{row_id}", source, origin, reason, tenant_id, device_id, received_at, bytes(payload),
        {}, replayed_at,
    )  # fmt: skip


def _db_list(conn: psycopg.Connection, flt: DlqFilter) -> list[DeadLetter]:
    rows = conn.execute(
        _DB_COLUMNS + "WHERE (%(tenants)s::text[] IS NULL OR d.tenant_id = ANY(%(tenants)s)) "
        "AND (%(device)s::text IS NULL OR d.device_id = %(device)s) "
        "AND (%(source)s::text IS NULL OR d.source = %(source)s) "
        "AND (%(reason)s::text IS NULL OR strpos(lower(d.reason), lower(%(reason)s)) > 0) "
        "AND (%(since)s::timestamptz IS NULL OR d.received_at >= %(since)s) "
        "AND (%(status)s = 'all' OR (r.id IS NULL) = (%(status)s = 'pending')) "
        "ORDER BY d.id LIMIT %(limit)s",
        {
            "tenants": None if flt.tenant_ids is None else sorted(flt.tenant_ids),
            "device": flt.device_id,
            "source": flt.source,
            "reason": flt.reason,
            "since": flt.since,
            "status": flt.status,
            "limit": flt.limit,
        },
    ).fetchall()
    return [_from_row(r) for r in rows]


def list_dead_letters(conn: psycopg.Connection, settings: Settings, flt: DlqFilter | None = None) -> list[DeadLetter]:
    """Dead letters matching `flt`, oldest first, at most `flt.limit`: the `dead_letters` table, and
    the DLQ topic when Kafka is configured (read from its start, or from `flt.since`)."""
    flt = flt or DlqFilter()
    flt = replace(flt, limit=max(1, min(flt.limit, MAX_LIMIT)))
    found = _db_list(conn, flt)
    if settings.kafka_bootstrap:
        found += _kafka_list(conn, settings, flt)
    found.sort(key=lambda e: (e.rejected_at or datetime.min.replace(tzinfo=UTC), e.id))
    return found[: flt.limit]


def get_dead_letters(
    conn: psycopg.Connection, settings: Settings, ids: Sequence[str], tenant_ids: Collection[str] | None = None
) -> tuple[list[DeadLetter], list[str]]:
    """The dead letters with these ids (in the order given) and the ids not found. With `tenant_ids`,
    those of other tenants count as not found."""
    rows: list[int] = []
    positions: list[tuple[int, int]] = []
    for i in ids:
        parsed = parse_id(i, settings)
        if isinstance(parsed, int):
            rows.append(parsed)
        elif parsed is not None:
            positions.append(parsed)
    found: dict[str, DeadLetter] = {}
    if rows:
        for row in conn.execute(_DB_COLUMNS + "WHERE d.id = ANY(%s)", (rows,)).fetchall():
            entry = _from_row(row)
            found[entry.id] = entry
    if positions and settings.kafka_bootstrap:
        for entry in _kafka_get(conn, settings, positions):
            found[entry.id] = entry
    visible = None if tenant_ids is None else set(tenant_ids)
    entries: list[DeadLetter] = []
    missing: list[str] = []
    seen: set[str] = set()
    for i in ids:
        hit = found.get(i)
        if hit is None or (visible is not None and hit.tenant_id not in visible):
            missing.append(i)
        elif i not in seen:
            entries.append(hit)
            seen.add(i)
    return entries, missing
