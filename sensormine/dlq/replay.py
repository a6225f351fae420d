"""Replaying dead letters after a fix: re-validated, re-submitted once, recorded (never twice)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import psycopg
from confluent_kafka import KafkaError, Message

from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.kafka import ensure_topics, make_producer
from sensormine.clients.postgres import INGEST, connect
from sensormine.dlq.letters import (
    DB_PREFIX,
    KAFKA_TIMEOUT_S,
    DeadLetter,
    DlqError,
    DlqFilter,
    _replayed_kafka,
    get_dead_letters,
    kafka_id,
    list_dead_letters,
    parse_id,
)
from sensormine.limits.storage import storage_position
from sensormine.reading import Reading, now_us
from sensormine.schemas.validation import SchemaDirectory
from sensormine.settings import Settings
from sensormine.telemetry.batch import parse_csv_batch, parse_json_batch
from sensormine.telemetry.payload import (
    ENVELOPE_VERSION,
    PayloadError,
    decode_envelope,
    encode_envelope,
    parse_device_payload,
)
from sensormine.telemetry.validation import validate_message

log = logging.getLogger(__name__)


DLQ_REPLAY_LOCK = 7_351_301  # one replay at a time: the skip-if-replayed check and the record stay consistent


LOCK_WAIT_S = 60.0


READINGS_PER_ENVELOPE = 5_000  # a replayed HTTP batch can be large: keep each Kafka message well under 1 MB


Outcome = Literal["resubmitted", "would_resubmit", "already_replayed", "still_rejected", "failed", "not_found"]


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


def _plan(
    conn: psycopg.Connection,
    settings: Settings,
    schemas: SchemaDirectory,
    entry: DeadLetter,
    now: int,
    storage_refusal: Callable[[str], str | None],
) -> _Plan:
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
    if (refusal := storage_refusal(tenant_id)) is not None:
        raise _Refused(refusal)  # resubmitted, it would only come back
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
        schemas = SchemaDirectory(lambda: connect(settings, role=INGEST))
        schemas.load(conn)
        now = now_us()
        today = datetime.fromtimestamp(now / 1e6, UTC).date()
        refusals: dict[str, str | None] = {}

        def storage_refusal(tenant_id: str) -> str | None:
            if tenant_id not in refusals:
                position = storage_position(conn, tenant_id, today)
                refusals[tenant_id] = None if position is None else position.refusal()
            return refusals[tenant_id]

        plans: list[_Plan] = []
        for entry in entries:
            if entry.id in done:
                by_id[entry.id] = ReplayOutcome(entry.id, "already_replayed", None, entry.tenant_id, entry.device_id)
                continue
            try:
                plans.append(_plan(conn, settings, schemas, entry, now, storage_refusal))
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
    entries, missing = select_for_replay(conn, settings, ids=ids, flt=flt)
    conn.commit()  # end the read: the replay writes in transactions of its own
    return replay_selected(conn, settings, entries, missing, replayed_by=replayed_by, dry_run=dry_run)


def select_for_replay(
    conn: psycopg.Connection, settings: Settings, *, ids: Sequence[str] | None = None, flt: DlqFilter | None = None
) -> tuple[list[DeadLetter], list[str]]:
    """The dead letters a replay would take (by `ids`, else the pending ones matching `flt`) and the ids not
    found; run it in the caller's tenant scope and row-level security decides which exist."""
    flt = flt or DlqFilter()
    if ids:
        return get_dead_letters(conn, settings, ids, flt.tenant_ids)
    return list_dead_letters(conn, settings, replace(flt, status="pending")), []


def replay_selected(
    conn: psycopg.Connection,
    settings: Settings,
    entries: list[DeadLetter],
    missing: Sequence[str] = (),
    *,
    replayed_by: str = "cli",
    dry_run: bool = False,
) -> ReplayReport:
    """Replay `entries` (from `select_for_replay`) on a connection that may record replays (the ingest role)."""
    report = replay(conn, settings, entries, replayed_by=replayed_by, dry_run=dry_run)
    report.outcomes += [ReplayOutcome(i, "not_found") for i in missing]
    return report
