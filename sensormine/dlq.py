"""Dead letters: list what ingest rejected, and replay it once a schema or a device is fixed.

Dead letters live in the Kafka topic `{env}.dlq` (original bytes, headers `reason`, `source`,
`origin`, `tenant_id`, `device_id`, ...) and, for rejects made without Kafka, in the `dead_letters`
table; both are listed. Each has a stable id: `{topic}/{partition}/{offset}` or `dead_letters/{id}`.

A replay re-runs a dead letter through the path of its origin, checking first what that path would
check (envelope or device payload, registered device, timestamps, the device's current schema):
- a Kafka envelope (rejected by the consumer, the in-process path, store-and-forward) goes back, as
  readings of its own tenant and device, to that tenant's telemetry topic;
- a device payload (MQTT, HTTP item or body) is parsed with `sensormine.payload` / `sensormine.batch`
  for the tenant and device it was rejected for, and published the same way.
Without Kafka the readings are written to the hot store directly. A dead letter whose readings were
re-submitted and confirmed durable is recorded in `dlq_replays` (in the same transaction as the rows,
without Kafka), so a second replay skips it; one that fails again is left pending and adds no new
dead letter. Readings are deduplicated by the hot store's primary key in any case. See docs/schemas.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import psycopg
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from sensormine.batch import parse_csv_batch, parse_json_batch
from sensormine.db import connect
from sensormine.hotstore import HotStoreWriter
from sensormine.kafka import ensure_topics, make_consumer, make_producer
from sensormine.payload import ENVELOPE_VERSION, PayloadError, decode_envelope, encode_envelope, parse_device_payload
from sensormine.reading import Reading, now_us, us_to_datetime
from sensormine.schemas import SchemaDirectory
from sensormine.settings import Settings
from sensormine.validation import validate_message

log = logging.getLogger(__name__)

DLQ_REPLAY_LOCK = 7_351_301  # one replay at a time: the skip-if-replayed check and the record stay consistent
DB_PREFIX = "dead_letters/"
KAFKA_TIMEOUT_S = 30.0
LOCK_WAIT_S = 60.0
READINGS_PER_ENVELOPE = 5_000  # a replayed HTTP batch can be large: keep each Kafka message well under 1 MB
MAX_LIMIT = 10_000

Status = Literal["pending", "replayed", "all"]
Outcome = Literal["resubmitted", "would_resubmit", "already_replayed", "still_rejected", "failed", "not_found"]


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


@dataclass(frozen=True)
class ReplayOutcome:
    """What a replay did with one dead letter."""

    id: str
    outcome: Outcome
    reason: str | None = None  # why it is still rejected, or why re-submitting failed
    tenant_id: str | None = None
    device_id: str | None = None
    readings: int = 0
    schema_version: int | None = None


@dataclass
class ReplayReport:
    """Outcomes of one replay, in the order the dead letters were given."""

    outcomes: list[ReplayOutcome] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        """How many dead letters ended with `outcome`."""
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    @property
    def counts(self) -> dict[str, int]:
        """Dead letters per outcome (only outcomes that occurred)."""
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.outcome] = counts.get(o.outcome, 0) + 1
        return counts


# -- ids --------------------------------------------------------------------------------------------


def kafka_id(topic: str, partition: int, offset: int) -> str:
    """Id of a dead letter in the DLQ topic."""
    return f"{topic}/{partition}/{offset}"


def parse_id(dead_letter_id: str, settings: Settings) -> tuple[int, int] | int | None:
    """(partition, offset) of a DLQ-topic id, the row id of a `dead_letters/<n>` id, or None.

    Only this environment's DLQ topic is accepted: an id cannot make the reader open another topic.
    """
    if dead_letter_id.startswith(DB_PREFIX):
        number = dead_letter_id[len(DB_PREFIX) :]
        return int(number) if number.isdigit() and len(number) < 19 else None
    topic, _, rest = dead_letter_id.partition("/")
    partition, _, offset = rest.partition("/")
    if topic != settings.dlq_topic or not partition.isdigit() or not offset.isdigit() or len(offset) > 18:
        return None
    return int(partition), int(offset)


# -- reading ---------------------------------------------------------------------------------------


def _headers(msg: Message) -> dict[str, str]:
    found = msg.headers() or []
    pairs = list(found.items()) if isinstance(found, dict) else found
    return {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in pairs if v is not None}


def _tenant_of_topic(topic: str, settings: Settings) -> str | None:
    prefix, suffix = f"{settings.env}.", ".telemetry"
    if topic.startswith(prefix) and topic.endswith(suffix) and len(topic) > len(prefix) + len(suffix):
        return topic[len(prefix) : -len(suffix)]
    return None


def _from_message(msg: Message, settings: Settings, replayed: dict[tuple[int, int], datetime]) -> DeadLetter:
    headers = _headers(msg)
    partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
    origin = headers.get("origin")
    key = msg.key()
    tenant = headers.get("tenant_id")
    if tenant is None and origin and "[" in origin:  # a consumer reject from before it named the tenant
        tenant = _tenant_of_topic(origin.split("[", 1)[0], settings)
    device = headers.get("device_id") or (key.decode("utf-8", "replace") if key else None)
    stamp = headers.get("rejected_at_us", "")
    if stamp.isdigit():
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
    conn.commit()
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
    conn.commit()
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


# -- replay ----------------------------------------------------------------------------------------


class _Refused(Exception):
    """The dead letter would be rejected again; its message is the reason."""


@dataclass(frozen=True)
class _Plan:
    entry: DeadLetter
    tenant_id: str
    device_id: str
    source: str
    readings: list[Reading]
    schema_version: int | None


def _envelope_doc(payload: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and doc.get("v") == ENVELOPE_VERSION and "points" in doc else None


def _device_readings(entry: DeadLetter, tenant_id: str, device_id: str, now: int) -> list[Reading]:
    """Readings of a device payload, parsed as its source would (an HTTP item, row or body, or MQTT)."""
    if entry.source != "http":
        return parse_device_payload(entry.payload, tenant_id, device_id, now)
    try:
        orjson.loads(entry.payload)
        outcome = parse_json_batch(entry.payload, tenant_id, device_id, now)
    except orjson.JSONDecodeError:
        outcome = parse_csv_batch(entry.payload, tenant_id, device_id, now)
    if outcome.rejects:
        first = outcome.rejects[0]
        raise PayloadError(f"item {first.index}: {first.error}")
    return outcome.readings


def _plan(conn: psycopg.Connection, settings: Settings, schemas: SchemaDirectory, entry: DeadLetter, now: int) -> _Plan:
    """What replaying `entry` would submit, checked as its path would check it; _Refused otherwise."""
    doc = _envelope_doc(entry.payload)
    try:
        if doc is not None:
            readings = decode_envelope(entry.payload)
            if not readings:
                raise _Refused("message has no readings")
            tenant_id, device_id = readings[0].tenant_id, readings[0].device_id
            if not isinstance(tenant_id, str) or not isinstance(device_id, str):
                raise _Refused("malformed envelope: tenant_id and device_id must be strings")
            for named, expected, what in (
                (tenant_id, entry.tenant_id, "tenant"),
                (device_id, entry.device_id, "device"),
            ):
                if expected is not None and named != expected:
                    raise _Refused(f"the envelope names {what} {named!r}, the dead letter {expected!r}")
            if any(type(r.ts) is not int or type(r.quality) is not int for r in readings):
                raise _Refused("malformed envelope: timestamps and qualities must be integers")
            source = doc["source"] if isinstance(doc.get("source"), str) else entry.source
        else:
            if not entry.tenant_id or not entry.device_id:
                raise _Refused("the dead letter names no tenant and device to replay it for")
            tenant_id, device_id, source = entry.tenant_id, entry.device_id, entry.source
            if (
                conn.execute(
                    "SELECT 1 FROM devices WHERE tenant_id = %s AND id = %s", (tenant_id, device_id)
                ).fetchone()
                is None
            ):
                raise _Refused(f"unknown device {device_id!r} of tenant {tenant_id!r}")
            readings = _device_readings(entry, tenant_id, device_id, now)
    except PayloadError as exc:
        raise _Refused(str(exc)) from None
    if conn.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant_id,)).fetchone() is None:
        raise _Refused(f"unknown tenant {tenant_id!r}")
    if (reason := validate_message(readings, settings, now)) is not None:
        raise _Refused(reason)
    if (violation := schemas.check(tenant_id, device_id, readings)) is not None:
        raise _Refused(str(violation))
    schema = schemas.for_device(tenant_id, device_id)
    return _Plan(entry, tenant_id, device_id, source, readings, schema.version if schema else None)


@contextmanager
def _replay_lock(conn: psycopg.Connection) -> Iterator[None]:
    """Hold the replay lock (a session advisory lock) on `conn`; DlqError after LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (DLQ_REPLAY_LOCK,)).fetchone()
        conn.commit()
        if row is not None and row[0]:
            break
        if time.monotonic() > deadline:
            raise DlqError("another replay is running; try again once it has finished")
        time.sleep(0.2)
    try:
        yield
    finally:
        if not conn.closed:
            conn.rollback()
            conn.execute("SELECT pg_advisory_unlock(%s)", (DLQ_REPLAY_LOCK,))
            conn.commit()


def _already_replayed(conn: psycopg.Connection, settings: Settings, entries: Sequence[DeadLetter]) -> set[str]:
    rows = [int(e.id[len(DB_PREFIX) :]) for e in entries if e.id.startswith(DB_PREFIX)]
    done = {f"{DB_PREFIX}{r}" for (r,) in conn.execute(
        "SELECT dead_letter_id FROM dlq_replays WHERE dead_letter_id = ANY(%s)", (rows,)
    ).fetchall()}  # fmt: skip
    if any(not e.id.startswith(DB_PREFIX) for e in entries):
        done |= {kafka_id(settings.dlq_topic, p, o) for p, o in _replayed_kafka(conn, settings.dlq_topic)}
    return done


def _record(conn: psycopg.Connection, settings: Settings, plans: Sequence[_Plan], replayed_by: str) -> None:
    """Mark dead letters replayed (inside the caller's transaction)."""
    params: list[tuple[Any, ...]] = []
    for p in plans:
        parsed = parse_id(p.entry.id, settings)
        if isinstance(parsed, int):
            position: tuple[str | None, int | None, int | None, int | None] = (None, None, None, parsed)
        else:
            assert parsed is not None
            position = (settings.dlq_topic, parsed[0], parsed[1], None)
        params.append((*position, p.tenant_id, p.device_id, p.source, len(p.readings), p.schema_version, replayed_by))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO dlq_replays (dlq_topic, kafka_partition, kafka_offset, dead_letter_id, tenant_id, device_id, "
            "source, readings, schema_version, replayed_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            params,
        )


def _outcome(plan: _Plan, outcome: Outcome, reason: str | None = None) -> ReplayOutcome:
    return ReplayOutcome(
        plan.entry.id, outcome, reason, plan.tenant_id, plan.device_id, len(plan.readings), plan.schema_version
    )


def _resubmit_kafka(
    conn: psycopg.Connection, settings: Settings, plans: list[_Plan], replayed_by: str
) -> list[ReplayOutcome]:
    """Produce each plan's readings to its tenant's topic; record those Kafka confirmed."""
    producer = make_producer(settings, **{"linger.ms": 5})
    ensure_topics(sorted({settings.telemetry_topic(p.tenant_id) for p in plans}), settings=settings)
    errors: dict[str, str] = {}
    pending: dict[str, int] = {}

    def on_delivery(entry_id: str) -> Callable[[KafkaError | None, Message], None]:
        def done(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors[entry_id] = f"Kafka delivery failed: {err}"
            pending[entry_id] -= 1

        return done

    for plan in plans:
        headers: list[tuple[str, str | bytes | None]] = [("replay_of", plan.entry.id.encode())]
        if plan.schema_version is not None:
            headers.append(("schema_version", str(plan.schema_version).encode()))
        chunks = [
            plan.readings[i : i + READINGS_PER_ENVELOPE] for i in range(0, len(plan.readings), READINGS_PER_ENVELOPE)
        ]
        pending[plan.entry.id] = len(chunks)
        for chunk in chunks:
            value = encode_envelope(plan.tenant_id, plan.device_id, plan.source, chunk)
            while True:
                try:
                    producer.produce(
                        settings.telemetry_topic(plan.tenant_id), value=value, key=plan.device_id.encode(),
                        headers=headers, on_delivery=on_delivery(plan.entry.id),
                    )  # fmt: skip
                    break
                except BufferError:
                    producer.poll(0.05)
    producer.flush(KAFKA_TIMEOUT_S)
    delivered = [p for p in plans if pending[p.entry.id] == 0 and p.entry.id not in errors]
    with conn.transaction():
        _record(conn, settings, delivered, replayed_by)
    ok = {p.entry.id for p in delivered}
    return [
        _outcome(p, "resubmitted")
        if p.entry.id in ok
        else _outcome(p, "failed", errors.get(p.entry.id, f"not confirmed by Kafka within {KAFKA_TIMEOUT_S:.0f} s"))
        for p in plans
    ]


def _resubmit_direct(
    conn: psycopg.Connection, settings: Settings, plans: list[_Plan], replayed_by: str
) -> list[ReplayOutcome]:
    """Without Kafka: write each plan's readings and its record in one transaction."""
    writer = HotStoreWriter(conn)
    outcomes = []
    for plan in plans:
        try:
            with conn.transaction():
                writer.write(plan.readings)
                _record(conn, settings, [plan], replayed_by)
        except psycopg.Error as exc:
            outcomes.append(_outcome(plan, "failed", f"hot-store write failed: {exc}"))
        else:
            outcomes.append(_outcome(plan, "resubmitted"))
    return outcomes


def replay(
    conn: psycopg.Connection,
    settings: Settings,
    entries: Sequence[DeadLetter],
    *,
    replayed_by: str = "cli",
    dry_run: bool = False,
) -> ReplayReport:
    """Re-submit dead letters (see the module docstring); one replay runs at a time.

    Each ends `resubmitted` (recorded, skipped from now on), `already_replayed`, `still_rejected`
    (with the reason; left pending), `failed` (Kafka or the database did not confirm; left pending),
    or with `dry_run`, `would_resubmit`. Schemas are read fresh, so a fix made just before counts.
    """
    by_id: dict[str, ReplayOutcome] = {}
    with _replay_lock(conn):
        done = _already_replayed(conn, settings, entries)
        schemas = SchemaDirectory(lambda: connect(settings))
        schemas.load(conn)
        now = now_us()
        plans: list[_Plan] = []
        for entry in entries:
            if entry.id in done:
                by_id[entry.id] = ReplayOutcome(entry.id, "already_replayed", None, entry.tenant_id, entry.device_id)
                continue
            try:
                plans.append(_plan(conn, settings, schemas, entry, now))
            except _Refused as exc:
                by_id[entry.id] = ReplayOutcome(entry.id, "still_rejected", str(exc), entry.tenant_id, entry.device_id)
        conn.commit()
        if dry_run:
            results = [_outcome(p, "would_resubmit") for p in plans]
        elif plans:
            resubmit = _resubmit_kafka if settings.kafka_bootstrap else _resubmit_direct
            results = resubmit(conn, settings, plans, replayed_by)
        else:
            results = []
        by_id.update((o.id, o) for o in results)
    report = ReplayReport([by_id[e.id] for e in entries])
    log.info("dlq replay by %s: %s", replayed_by, report.counts)
    return report


def replay_matching(
    conn: psycopg.Connection,
    settings: Settings,
    *,
    ids: Sequence[str] | None = None,
    flt: DlqFilter | None = None,
    replayed_by: str = "cli",
    dry_run: bool = False,
) -> ReplayReport:
    """Replay the dead letters with these `ids` (those not found, or outside `flt.tenant_ids`, end
    `not_found`), or else the pending ones matching `flt`."""
    flt = flt or DlqFilter()
    if ids:
        entries, missing = get_dead_letters(conn, settings, ids, flt.tenant_ids)
    else:
        entries, missing = list_dead_letters(conn, settings, replace(flt, status="pending")), []
    report = replay(conn, settings, entries, replayed_by=replayed_by, dry_run=dry_run)
    report.outcomes += [ReplayOutcome(i, "not_found") for i in missing]
    return report
