"""Usage events through the real services: accepted payload bytes metered by the hot-store consumer
(Kafka) and the in-process path, the API's response bytes through `{env}.metering.events` and the
metering consumer, each event counted once however often it is delivered, and the ledger equal to
an independent DuckDB computation over the raw events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import duckdb
import psycopg
import pytest
from confluent_kafka import Producer
from fastapi.testclient import TestClient

from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.metering import MeteringConsumer
from lake.usage import compute_usage_day
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.postgres import INGEST, LAKE, METERING, connect
from sensormine.identity.api_keys import create_api_key
from sensormine.ingest.sinks import DirectSink, KafkaSink
from sensormine.metering.usage_events import DATA_EGRESS, DATA_INGESTED, UsageEvent
from sensormine.reading import now_us
from sensormine.settings import Settings
from sensormine.telemetry.payload import encode_envelope
from serving.main import create_app
from tests.factories import drain_topic, make_tenant, readings, run_until_idle

pytestmark = pytest.mark.integration

START_US = 1_795_687_200_000_000


def ledger(conn: psycopg.Connection, metric: str) -> dict[str, int]:
    conn.commit()
    rows = conn.execute("SELECT tenant_id, sum(value) FROM usage WHERE metric = %s GROUP BY 1", (metric,)).fetchall()
    return {t: int(v) for t, v in rows}


def duckdb_sums(conn: psycopg.Connection, resource: str) -> dict[str, int]:
    """The same sums, computed by DuckDB from the raw events (not by the function that stored them)."""
    rows = conn.execute(
        "SELECT event_id, tenant_id, ts, resource, quantity FROM usage_events WHERE resource = %s", (resource,)
    ).fetchall()
    db = duckdb.connect()
    db.execute("CREATE TABLE ev (event_id TEXT, tenant_id TEXT, ts TIMESTAMPTZ, resource TEXT, quantity BIGINT)")
    if rows:
        db.executemany("INSERT INTO ev VALUES (?, ?, ?, ?, ?)", rows)
    got = db.execute("SELECT tenant_id, sum(quantity) FROM ev GROUP BY tenant_id").fetchall()
    return {t: int(v) for t, v in got}


def run_metering(settings: Settings, group_id: str | None = None) -> MeteringConsumer:
    return run_until_idle(MeteringConsumer(settings, group_id))


def test_consumer_meters_accepted_payload_bytes_once(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    make_tenant(conn, "globex", ["g1"])
    topics = [settings.telemetry_topic("acme"), settings.telemetry_topic("globex"), settings.dlq_topic]
    ensure_topics(topics, settings=settings)
    sink = KafkaSink(settings)
    sent: dict[str, int] = {"acme": 0, "globex": 0}
    for tenant, device in (("acme", "d1"), ("acme", "d2"), ("globex", "g1")):
        for chunk in range(5):
            batch = readings(tenant, device, 10, start_us=START_US + chunk * 10_000_000)
            sink.publish(tenant, device, "test", batch)
            sent[tenant] += len(encode_envelope(tenant, device, "test", batch))
    sink.producer.produce(settings.telemetry_topic("acme"), b"not an envelope: not metered", key=b"d1")
    assert sink.flush(30) == 0

    consumer = run_until_idle(HotStoreConsumer(settings))
    assert consumer.stats.rejected == 1
    assert ledger(conn, DATA_INGESTED) == sent
    assert duckdb_sums(conn, DATA_INGESTED) == sent
    sources = conn.execute("SELECT DISTINCT source FROM usage_events").fetchall()
    assert sources == [("ingest:consumer",)]

    # The offsets are lost and Kafka redelivers everything: the readings dedupe, and so does the metering
    # (the events carry the ids of the records they cover).
    conn.execute("DELETE FROM ingest_offsets")
    conn.commit()
    again = run_until_idle(HotStoreConsumer(settings))
    assert again.stats.messages == 16
    assert ledger(conn, DATA_INGESTED) == sent

    # The daily rollup counts the day's ingested bytes as DuckDB does over the raw events.
    with connect(settings, role=METERING) as metering, connect(settings, role=LAKE) as lake_conn:
        records, _ = compute_usage_day(settings, metering, lake_conn, "acme", datetime.now(UTC).date())
    assert {r.resource_type: r.quantity for r in records}[DATA_INGESTED] == duckdb_sums(conn, DATA_INGESTED)["acme"]


def test_in_process_path_meters_the_envelope_bytes(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    embedded = settings.model_copy(update={"kafka_bootstrap": None})
    sink = DirectSink(lambda: connect(embedded, role=INGEST), embedded)
    try:
        batch = readings("acme", "d1", 25, start_us=START_US)
        sink.publish("acme", "d1", "http", batch)
        future = batch[0]._replace(ts=now_us() + 10 * 86_400_000_000)
        sink.publish("acme", "d1", "http", [future])  # rejected (in the future): not metered
    finally:
        sink.close()
    assert ledger(conn, DATA_INGESTED) == {"acme": len(encode_envelope("acme", "d1", "http", batch))}
    meta = conn.execute("SELECT source, metadata FROM usage_events").fetchall()
    assert meta == [("ingest:in-process", {"device_id": "d1", "readings": str(len(batch))})]


def event(tenant_id: str, quantity: int, event_id: str | None = None) -> UsageEvent:
    return UsageEvent(event_id or uuid.uuid4().hex, tenant_id, datetime.now(UTC), DATA_EGRESS, quantity, "test")


def test_metering_consumer_counts_each_event_once(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", [])
    make_tenant(conn, "globex", [])
    ensure_topics([settings.metering_topic, settings.dlq_topic], settings=settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    twice = event("acme", 700, "egress-once")
    for e in (event("acme", 100), twice, event("globex", 5), twice):
        producer.produce(settings.metering_topic, e.to_json(), e.tenant_id.encode())
    producer.produce(settings.metering_topic, b'{"event_id": "x", "tenant_id": "acme"}', b"acme")
    producer.produce(settings.metering_topic, event("acme", 1, "bad").to_json().replace(b"data_egress", b"gold"))
    assert producer.flush(30) == 0

    first = run_metering(settings)
    assert (first.stats.messages, first.stats.stored, first.stats.rejected) == (6, 3, 2)
    assert ledger(conn, DATA_EGRESS) == {"acme": 800, "globex": 5}

    # The same event delivered again later (a producer's retry) and a whole replay of the topic by a
    # new group: nothing more is counted.
    producer.produce(settings.metering_topic, twice.to_json(), b"acme")
    assert producer.flush(30) == 0
    later = run_metering(settings)
    assert (later.stats.messages, later.stats.stored, later.stats.replayed) == (1, 0, 1)
    replay = run_metering(settings, group_id=f"{settings.env}.replay")
    assert (replay.stats.messages, replay.stats.stored) == (7, 0)
    assert ledger(conn, DATA_EGRESS) == {"acme": 800, "globex": 5} == duckdb_sums(conn, DATA_EGRESS)

    dead = drain_topic(settings.kafka_bootstrap, settings.dlq_topic)
    reasons = sorted({dict(m.headers())["reason"].decode() for m in dead})
    assert len(dead) == 4  # each bad message once per group that read it
    assert reasons == ["not a usage event: missing ts, resource, quantity, source", reasons[1]]
    assert reasons[1].startswith("not a usage event: unknown resource 'gold'")


@pytest.mark.parametrize("kafka", [True, False], ids=["kafka", "in-process"])
def test_api_response_bytes_are_metered_as_egress(settings: Settings, conn: psycopg.Connection, kafka: bool) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    make_tenant(conn, "globex", ["g1"])
    keys = {t: {"X-API-Key": create_api_key(conn, t, "reader", role="tenant_admin")} for t in ("acme", "globex")}
    conn.commit()
    app_settings = settings if kafka else settings.model_copy(update={"kafka_bootstrap": None})
    if kafka:
        ensure_topics([settings.metering_topic], settings=settings)
    sent = {"acme": 0, "globex": 0}
    with TestClient(create_app(app_settings)) as client:
        for tenant, path in [("acme", "/api/devices"), ("acme", "/api/devices/d1"), ("globex", "/api/devices")] * 3:
            got = client.get(path, headers=keys[tenant])
            assert got.status_code == 200, got.text
            sent[tenant] += len(got.content)
        assert client.get("/api/devices").status_code == 401  # no tenant: not metered
    # The app's shutdown emitted the last counts.
    if kafka:
        assert ledger(conn, DATA_EGRESS) == {}  # on the topic, not yet in the ledger
        run_metering(settings)
    assert ledger(conn, DATA_EGRESS) == sent
    assert duckdb_sums(conn, DATA_EGRESS) == sent
