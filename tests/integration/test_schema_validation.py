"""Device schemas in the ingest path and DLQ replay, through real Kafka and PostgreSQL.

A message that breaks its device's schema lands in the DLQ with the failing JSON pointer; after the
schema is fixed, `sensormine dlq replay` brings it in exactly once, however often it is replayed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orjson
import psycopg
import pytest

from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.mqtt import MqttIngest
from sensormine.clients.hotstore import stored_offsets
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.mqtt import telemetry_topic
from sensormine.clients.postgres import INGEST, connect
from sensormine.devices.registry import DeviceDirectory, create_device
from sensormine.dlq.letters import DlqFilter, list_dead_letters
from sensormine.dlq.replay import replay_matching
from sensormine.ingest.sinks import DirectSink, KafkaSink
from sensormine.reading import Reading
from sensormine.schemas.compat import IncompatibleSchema
from sensormine.schemas.store import latest_schema, register_schema
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant
from tests.factories import DAY_US, drain_topic, wait_until

pytestmark = pytest.mark.integration


SECOND = 1_000_000


def thermo(maximum: float) -> dict:
    """The thermo payload schema with a temperature ceiling."""
    return {
        "type": "object",
        "properties": {
            "ts": {"type": "string"},
            "values": {
                "type": "object",
                "properties": {
                    "temperature": {"type": "number", "minimum": -40, "maximum": maximum},
                    "pressure": {"type": "number", "minimum": 0},
                },
                "required": ["temperature"],
            },
        },
        "required": ["ts", "values"],
    }


def telemetry(conn: psycopg.Connection) -> list[tuple]:
    """Every hot-store row as (device, metric, ts µs, value); ends the read's transaction."""
    rows = conn.execute(
        "SELECT device_id, metric, (extract(epoch FROM ts) * 1000000)::bigint, value FROM telemetry ORDER BY 1, 2, 3"
    ).fetchall()
    conn.commit()
    return rows


@contextmanager
def running_consumer(settings: Settings) -> Iterator[HotStoreConsumer]:
    """A consumer running in the background, as in production."""
    consumer = HotStoreConsumer(settings)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), name="test-consumer")
    thread.start()
    try:
        yield consumer
    finally:
        stop.set()
        thread.join(60)
        consumer.close()


def committed(conn: psycopg.Connection, settings: Settings) -> int:
    """Messages the consumer group has committed (rejected ones included)."""
    done = sum(stored_offsets(conn, settings.consumer_group).values())
    conn.commit()
    return done


def test_a_violation_lands_in_the_dlq_and_replay_after_the_fix_brings_it_in_once(
    settings: Settings, conn: psycopg.Connection, cli: Callable[..., object]
) -> None:
    create_tenant(conn, "acme")
    create_device(conn, "acme", "t1", device_type="thermo")
    create_device(conn, "acme", "plain")  # no type, so no schema: validation must not touch it
    assert register_schema(conn, "acme", "thermo", thermo(maximum=50)) == 1
    ensure_topics([settings.telemetry_topic("acme"), settings.dlq_topic], settings=settings)
    t0, t1 = DAY_US + 10 * SECOND, DAY_US + 11 * SECOND
    sink = KafkaSink(settings)
    sink.publish(
        "acme",
        "t1",
        "mqtt",
        [Reading("acme", "t1", "temperature", t0, 21.5), Reading("acme", "t1", "pressure", t0, 1.0)],
    )
    sink.publish(
        "acme",
        "t1",
        "mqtt",
        [Reading("acme", "t1", "temperature", t1, 80.5), Reading("acme", "t1", "pressure", t1, 1.1)],
    )
    sink.publish("acme", "plain", "mqtt", [Reading("acme", "plain", "temperature", t0, 80.5)])
    assert sink.flush(30) == 0

    with running_consumer(settings) as consumer:
        assert wait_until(lambda: committed(conn, settings) == 3)
        assert telemetry(conn) == [
            ("plain", "temperature", t0, 80.5),
            ("t1", "pressure", t0, 1.0),
            ("t1", "temperature", t0, 21.5),
        ]
        assert consumer.stats.rejected == 1
        [dead] = drain_topic(settings.kafka_bootstrap, settings.dlq_topic, idle_s=1.0)
        headers = {k: v.decode() for k, v in dead.headers()}
        assert headers["reason"] == (
            "schema thermo v1: 80.5 is greater than the maximum of 50 "
            "(at /values/temperature, item ts 2026-11-26T00:00:11+00:00)"
        )
        assert (headers["pointer"], headers["schema_version"], headers["device_type"]) == (
            "/values/temperature",
            "1",
            "thermo",
        )
        assert (headers["source"], headers["tenant_id"], headers["device_id"]) == ("consumer", "acme", "t1")
        dead_id = f"{settings.dlq_topic}/{dead.partition()}/{dead.offset()}"

        # Before the fix, a replay finds it still invalid and leaves it (and the DLQ) as they are.
        before = cli("dlq", "replay", "--tenant", "acme")
        assert before.exit_code == 0, before.output
        assert f"{dead_id}\tstill_rejected\tschema thermo v1: 80.5 is greater than the maximum of 50" in before.output

        # The fix: the next version widens the range (a compatible change).
        assert register_schema(conn, "acme", "thermo", thermo(maximum=100)) == 2
        listed = cli("dlq", "list", "--status", "pending", "--json")
        assert listed.exit_code == 0, listed.output
        [entry] = orjson.loads(listed.stdout)
        assert (entry["id"], entry["status"], entry["headers"]["pointer"]) == (
            dead_id,
            "pending",
            "/values/temperature",
        )

        first = cli("dlq", "replay", "--tenant", "acme")
        assert first.exit_code == 0, first.output
        assert f"{dead_id}\tresubmitted\t2 readings" in first.output
        second = cli("dlq", "replay", "--tenant", "acme")
        assert "nothing to replay" in second.output
        by_id = cli("dlq", "replay", dead_id)
        assert f"{dead_id}\talready_replayed" in by_id.output
        assert wait_until(lambda: committed(conn, settings) == 4)  # the one replayed message, and no other
        assert telemetry(conn) == [
            ("plain", "temperature", t0, 80.5),
            ("t1", "pressure", t0, 1.0),
            ("t1", "pressure", t1, 1.1),
            ("t1", "temperature", t0, 21.5),
            ("t1", "temperature", t1, 80.5),
        ]
    assert consumer.stats.rejected == 1 and consumer.stats.readings == 3 + 2
    replays = [
        m for m in drain_topic(settings.kafka_bootstrap, settings.telemetry_topic("acme"), idle_s=1.0)
        if dict(m.headers() or []).get("replay_of") == dead_id.encode()
    ]  # fmt: skip
    assert len(replays) == 1
    assert len(drain_topic(settings.kafka_bootstrap, settings.dlq_topic, idle_s=1.0)) == 1
    assert conn.execute("SELECT source, readings, schema_version, replayed_by FROM dlq_replays").fetchall() == [
        ("mqtt", 2, 2, "cli")
    ]
    [replayed] = list_dead_letters(conn, settings, DlqFilter(status="replayed"))
    assert replayed.id == dead_id


def test_a_running_consumer_picks_up_the_fixed_schema_of_a_replayed_message(
    settings: Settings, conn: psycopg.Connection
) -> None:
    create_tenant(conn, "acme")
    create_device(conn, "acme", "t1", device_type="thermo")
    register_schema(conn, "acme", "thermo", thermo(maximum=50))
    ensure_topics([settings.telemetry_topic("acme"), settings.dlq_topic], settings=settings)
    sink = KafkaSink(settings)
    bad = [Reading("acme", "t1", "temperature", DAY_US + s * SECOND, 60.0 + s) for s in range(3)]
    sink.publish("acme", "t1", "mqtt", bad)
    sink.flush(30)
    with running_consumer(settings) as consumer:
        assert wait_until(lambda: consumer.stats.rejected == 1)
        # Only the replayed message's schema_version header may make the consumer reload its cache.
        consumer.schema_recheck_s = 3600.0
        register_schema(conn, "acme", "thermo", thermo(maximum=70))
        report = replay_matching(conn, settings, flt=DlqFilter(tenant_ids=frozenset({"acme"})))
        assert report.counts == {"resubmitted": 1}
        assert wait_until(lambda: len(telemetry(conn)) == 3)
    assert consumer.stats.rejected == 1  # the replayed message was not rejected again
    assert [row[3] for row in telemetry(conn)] == [60.0, 61.0, 62.0]


def test_incompatible_versions_are_refused_unless_forced(conn: psycopg.Connection) -> None:
    create_tenant(conn, "acme")
    register_schema(conn, "acme", "thermo", thermo(maximum=50))
    narrower = thermo(maximum=40)
    with pytest.raises(IncompatibleSchema, match=r"narrows the range of temperature from \[-40, 50\] to \[-40, 40\]"):
        register_schema(conn, "acme", "thermo", narrower)
    removed = thermo(maximum=50)
    del removed["properties"]["values"]["properties"]["pressure"]
    with pytest.raises(IncompatibleSchema, match="removes /properties/values/properties/pressure") as refused:
        register_schema(conn, "acme", "thermo", removed)
    assert refused.value.previous == 1 and "register with force" in str(refused.value)
    assert latest_schema(conn, "acme", "thermo") == (1, thermo(maximum=50))
    assert register_schema(conn, "acme", "thermo", removed, force=True) == 2
    assert latest_schema(conn, "acme", "thermo") == (2, removed)


def test_without_kafka_a_device_fix_then_a_schema_fix_bring_rejected_payloads_in_once(
    settings: Settings, conn: psycopg.Connection
) -> None:
    local = settings.model_copy(update={"kafka_bootstrap": None})
    create_tenant(conn, "acme")
    sink = DirectSink(lambda: connect(local, role=INGEST), local)
    ingest = MqttIngest(sink, DeviceDirectory(lambda: connect(local, role=INGEST)).contains)
    topic = telemetry_topic("acme", "press-9")
    ok = {"ts": "2026-11-26T10:00:00Z", "values": {"temperature": 30.0}}
    hot = [{"ts": "2026-11-26T10:00:01Z", "values": {"temperature": 75.0}}]
    assert not ingest.handle(topic, orjson.dumps(ok))  # the device is not registered yet
    assert not ingest.handle(topic, orjson.dumps(hot))
    sink.close()
    pending = list_dead_letters(conn, local, DlqFilter(status="pending"))
    assert [(e.source, e.reason) for e in pending] == [("mqtt", "unknown device 'press-9' of tenant 'acme'")] * 2

    # The device fix: register it (with a type whose schema caps the temperature at 50).
    create_device(conn, "acme", "press-9", device_type="thermo")
    register_schema(conn, "acme", "thermo", thermo(maximum=50))
    report = replay_matching(conn, local, flt=DlqFilter(tenant_ids=frozenset({"acme"})))
    assert [o.outcome for o in report.outcomes] == ["resubmitted", "still_rejected"]
    assert report.outcomes[1].reason == (
        "schema thermo v1: 75.0 is greater than the maximum of 50 "
        "(at /values/temperature, item ts 2026-11-26T10:00:01+00:00)"
    )
    # The schema fix brings in the second; replaying everything again changes nothing.
    register_schema(conn, "acme", "thermo", thermo(maximum=80))
    assert replay_matching(conn, local, flt=DlqFilter(device_id="press-9")).counts == {"resubmitted": 1}
    assert replay_matching(conn, local, flt=DlqFilter(device_id="press-9")).counts == {}
    ids = [e.id for e in pending]
    assert replay_matching(conn, local, ids=ids).counts == {"already_replayed": 2}
    assert [row[2:] for row in telemetry(conn)] == [
        (DAY_US + 10 * 3600 * SECOND, 30.0),
        (DAY_US + (10 * 3600 + 1) * SECOND, 75.0),
    ]
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (2,)  # no new dead letter
