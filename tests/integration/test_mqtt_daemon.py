"""The MQTT daemon against the real Mosquitto, on the in-process path (no Kafka) and into Kafka."""

from __future__ import annotations

import time

import orjson
import psycopg
import pytest

from ingest_daemons.mqtt import MqttDaemon
from sensormine.clients.mqtt import telemetry_topic
from sensormine.devices.registry import create_device
from sensormine.settings import Settings
from sensormine.telemetry.payload import decode_envelope
from tests.factories import drain_topic, make_tenant, mqtt_publish, wait_until

pytestmark = pytest.mark.integration


GOOD = {"ts": "2026-11-26T10:00:00Z", "values": {"temperature": 21.5, "pressure": 1.01}}


def test_in_process_path_writes_rows_and_dead_letters(settings: Settings, conn: psycopg.Connection) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["press-1"])
    daemon = MqttDaemon(direct).start()
    try:
        mqtt_publish(
            direct,
            [
                (telemetry_topic("acme", "press-1"), orjson.dumps(GOOD)),
                (telemetry_topic("acme", "press-1"), b"{broken"),
                (telemetry_topic("acme", "ghost"), orjson.dumps(GOOD)),
                (telemetry_topic("nobody", "press-1"), orjson.dumps(GOOD)),
            ],
        )
        assert wait_until(lambda: daemon.ingest.stats.received == 4)
    finally:
        daemon.stop()
    rows = conn.execute("SELECT tenant_id, device_id, metric, value FROM telemetry ORDER BY metric").fetchall()
    assert rows == [("acme", "press-1", "pressure", 1.01), ("acme", "press-1", "temperature", 21.5)]
    dead = conn.execute("SELECT origin, reason, payload FROM dead_letters ORDER BY id").fetchall()
    assert [d[0] for d in dead] == [
        telemetry_topic("acme", "press-1"),
        telemetry_topic("acme", "ghost"),
        telemetry_topic("nobody", "press-1"),
    ]
    assert dead[0][1].startswith("malformed JSON") and bytes(dead[0][2]) == b"{broken"
    assert "unknown device 'ghost'" in dead[1][1]
    assert "unknown device" in dead[2][1]


def test_new_device_is_accepted_within_a_second(settings: Settings, conn: psycopg.Connection) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", [])
    daemon = MqttDaemon(direct).start()
    try:
        create_device(conn, "acme", "late-1")
        time.sleep(1.1)  # the directory refreshes on a miss at most once a second
        mqtt_publish(direct, [(telemetry_topic("acme", "late-1"), orjson.dumps(GOOD))])
        assert wait_until(lambda: daemon.ingest.stats.received == 1)
    finally:
        daemon.stop()
    assert daemon.ingest.stats.accepted == 1
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 2


def test_kafka_path_produces_envelopes_and_dlq(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["press-1"])
    daemon = MqttDaemon(settings).start()
    try:
        mqtt_publish(
            settings,
            [
                (telemetry_topic("acme", "press-1"), orjson.dumps(GOOD)),
                (telemetry_topic("acme", "press-1"), orjson.dumps({"ts": "noon", "values": {"a": 1}})),
            ],
        )
        assert wait_until(lambda: daemon.ingest.stats.received == 2)
    finally:
        daemon.stop()
    telemetry = drain_topic(settings.kafka_bootstrap, settings.telemetry_topic("acme"))
    assert [m.key() for m in telemetry] == [b"press-1"]
    points = decode_envelope(telemetry[0].value())
    assert [(r.device_id, r.metric, r.value) for r in points] == [
        ("press-1", "temperature", 21.5),
        ("press-1", "pressure", 1.01),
    ]
    dlq = drain_topic(settings.kafka_bootstrap, settings.dlq_topic)
    assert len(dlq) == 1
    headers = dict(dlq[0].headers())
    assert headers["reason"].startswith(b"unparseable timestamp")
    assert headers["source"] == b"mqtt" and headers["tenant_id"] == b"acme"
    assert orjson.loads(dlq[0].value()) == {"ts": "noon", "values": {"a": 1}}


def test_in_process_path_reconnects_after_the_database_drops_it(settings: Settings, conn: psycopg.Connection) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["press-1"])
    daemon = MqttDaemon(direct).start()
    try:
        mqtt_publish(direct, [(telemetry_topic("acme", "press-1"), orjson.dumps(GOOD))])
        assert wait_until(lambda: daemon.ingest.stats.accepted == 1)
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        conn.commit()
        later = {"ts": "2026-11-26T10:00:01Z", "values": {"temperature": 22.0}}
        mqtt_publish(direct, [(telemetry_topic("acme", "press-1"), orjson.dumps(later))])
        assert wait_until(lambda: daemon.ingest.stats.accepted == 2)
    finally:
        daemon.stop()
    assert wait_until(lambda: conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 3, timeout=5)


def test_messages_published_while_the_daemon_is_down_arrive_after_restart(
    settings: Settings, conn: psycopg.Connection
) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["press-1"])
    MqttDaemon(direct).start().stop()  # registers the persistent session, then goes away
    messages = [
        (telemetry_topic("acme", "press-1"), orjson.dumps({"ts": f"2026-11-26T10:00:{i:02d}Z", "values": {"a": i}}))
        for i in range(20)
    ]
    mqtt_publish(direct, messages)  # nobody is connected: the broker queues them for the session
    daemon = MqttDaemon(direct).start()
    try:
        assert wait_until(lambda: daemon.ingest.stats.accepted == 20)
    finally:
        daemon.stop()
    assert conn.execute("SELECT count(*), sum(value) FROM telemetry").fetchone() == (20, sum(range(20)))


class _Swallow:
    """A sink that takes messages and never makes them durable (a daemon that dies before acking)."""

    def __init__(self) -> None:
        self.seen = 0

    def publish(self, *args, done=None) -> None:
        self.seen += 1

    def reject(self, *args, done=None) -> None:
        self.seen += 1

    def poll(self, timeout: float = 0.0) -> None:
        time.sleep(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        return 0


def test_unacknowledged_messages_are_redelivered_to_the_next_daemon(
    settings: Settings, conn: psycopg.Connection
) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["press-1"])
    swallow = _Swallow()
    first = MqttDaemon(direct, sink=swallow).start()  # type: ignore[arg-type]
    messages = [
        (telemetry_topic("acme", "press-1"), orjson.dumps({"ts": f"2026-11-26T10:00:{i:02d}Z", "values": {"a": i}}))
        for i in range(10)
    ]
    mqtt_publish(direct, messages)
    assert wait_until(lambda: swallow.seen == 10)
    first.stop()  # nothing was acknowledged
    second = MqttDaemon(direct).start()
    try:
        assert wait_until(lambda: second.ingest.stats.accepted == 10)
    finally:
        second.stop()
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 10
