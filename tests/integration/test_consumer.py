"""The Kafka → hot-store consumer against real Kafka and PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from ingest_daemons.consumer import HotStoreConsumer
from sensormine.clients.hotstore import stored_offsets
from sensormine.clients.kafka import ensure_topics
from sensormine.ingest.sinks import KafkaSink
from sensormine.reading import now_us
from sensormine.settings import Settings
from tests.factories import drain_topic, make_tenant, readings, run_until_idle

pytestmark = pytest.mark.integration


def run_consumer(settings: Settings) -> HotStoreConsumer:
    return run_until_idle(HotStoreConsumer(settings), 4.0)


def test_consumer_writes_valid_and_dead_letters_invalid(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    make_tenant(conn, "globex", ["g1"])
    ensure_topics(
        [settings.telemetry_topic("acme"), settings.telemetry_topic("globex"), settings.dlq_topic], settings=settings
    )
    sink = KafkaSink(settings)
    for device in ("d1", "d2"):
        for chunk in range(10):
            sink.publish(
                "acme",
                device,
                "test",
                readings("acme", device, 10, start_us=1_795_687_200_000_000 + chunk * 10_000_000),
            )
    sink.publish("globex", "g1", "test", readings("globex", "g1", 7))
    sink.producer.produce(settings.telemetry_topic("acme"), b"not an envelope", key=b"d1")
    future = readings("acme", "d1", 1, start_us=now_us() + 10 * 86_400_000_000)
    sink.publish("acme", "d1", "test", future)
    assert sink.flush(30) == 0

    consumer = run_consumer(settings)

    counts = dict(conn.execute("SELECT tenant_id, count(*) FROM telemetry GROUP BY 1").fetchall())
    assert counts == {"acme": 2 * 10 * 10 * 2, "globex": 14}
    assert consumer.stats.rejected == 2
    dlq = drain_topic(settings.kafka_bootstrap, settings.dlq_topic)
    reasons = sorted(dict(m.headers())["reason"].decode() for m in dlq)
    assert len(reasons) == 2
    assert reasons[0].startswith("malformed envelope")
    assert "in the future" in reasons[1]
    assert b"not an envelope" in [m.value() for m in dlq]
    # Offsets in the database cover every message, rejected ones included.
    offsets = stored_offsets(conn, settings.consumer_group)
    assert sum(offsets.values()) == 20 + 1 + 1 + 1


def test_rerun_with_lost_offsets_creates_no_duplicates(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    ensure_topics([settings.telemetry_topic("acme")], settings=settings)
    sink = KafkaSink(settings)
    for chunk in range(5):
        sink.publish(
            "acme", "d1", "test", readings("acme", "d1", 20, start_us=1_795_687_200_000_000 + chunk * 20_000_000)
        )
    sink.flush(30)
    run_consumer(settings)
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 200
    # Simulate the worst case: the stored offsets are gone, so Kafka redelivers everything.
    conn.execute("DELETE FROM ingest_offsets")
    conn.commit()
    second = run_consumer(settings)
    assert second.stats.readings == 200
    assert (second.stats.inserted, second.stats.duplicates) == (0, 200)
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 200
