"""The whole path on real services: MQTT → daemon → Kafka → consumer → PostgreSQL → Dagster → Delta → REST."""

from __future__ import annotations

import threading
import time
from datetime import date

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.mqtt import MqttDaemon
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.mqtt import telemetry_topic
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import drain_topic, make_tenant, mqtt_publish

pytestmark = pytest.mark.e2e

DAY = date(2026, 11, 26)
DEVICES = {"acme": ["motor-1", "tank-1"], "globex": ["motor-1"]}  # same device id in both tenants on purpose
N_PER_DEVICE = 60
METRICS = ("temperature", "pressure")


def good_messages() -> list[tuple[str, bytes]]:
    out = []
    for tenant, devices in DEVICES.items():
        for device in devices:
            for i in range(N_PER_DEVICE):
                ts = f"2026-11-26T10:{i // 60:02d}:{i % 60:02d}Z"
                body = {"ts": ts, "values": {"temperature": 20 + i / 10, "pressure": 1 + i / 1000}}
                if tenant == "globex":
                    body["values"] = {k: -v for k, v in body["values"].items()}  # tell the tenants apart
                out.append((telemetry_topic(tenant, device), orjson.dumps(body)))
    return out


BAD = [
    (telemetry_topic("acme", "motor-1"), b'{"ts": "2026-11-26T10:00:00Z", "values": {"temperature": "hot"}}'),
    (telemetry_topic("acme", "motor-1"), b"\xff\xfe not json"),
    (telemetry_topic("acme", "ghost"), orjson.dumps({"ts": "2026-11-26T10:00:00Z", "values": {"a": 1}})),
    (telemetry_topic("initech", "motor-1"), orjson.dumps({"ts": "2026-11-26T10:00:00Z", "values": {"a": 1}})),
    (telemetry_topic("globex", "motor-1"), orjson.dumps({"ts": "26/11/2026", "values": {"a": 1}})),
]


def hot_count(conn: psycopg.Connection) -> int:
    n = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
    conn.commit()
    return n


def query(client: TestClient, key: str, device: str, **params: str) -> dict:
    resp = client.get(
        "/api/query/telemetry",
        params={"device_id": device, "start": "2026-11-26T00:00:00Z", "end": "2026-11-27T00:00:00Z", **params},
        headers={"X-API-Key": key},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def materialize_day(settings: Settings, tenants: list[str], day: date) -> None:
    """Run the Dagster asset in-process for each tenant's partition of `day`."""
    import dagster as dg

    from assets.telemetry import telemetry_lake, telemetry_partition_key
    from orchestration.resources import HotStoreResource, LakeResource

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", tenants)
        resources = {
            "hot_store": HotStoreResource(database_url=settings.database_url),
            "lake": LakeResource(lake_uri=settings.lake_uri),
        }
        for tenant in tenants:
            result = dg.materialize(
                [telemetry_lake],
                partition_key=str(telemetry_partition_key(tenant, day)),
                resources=resources,
                instance=instance,
            )
            assert result.success


def test_reading_travels_mqtt_to_rest_through_both_tiers(settings: Settings, conn: psycopg.Connection) -> None:
    keys = {t: make_tenant(conn, t, devices) for t, devices in DEVICES.items()}
    ensure_topics([settings.telemetry_topic(t) for t in DEVICES] + [settings.dlq_topic], settings=settings)

    daemon = MqttDaemon(settings).start()
    consumer = HotStoreConsumer(settings)
    stop = threading.Event()
    worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    worker.start()
    good = good_messages()
    expected = {t: len(ds) * N_PER_DEVICE * len(METRICS) for t, ds in DEVICES.items()}
    try:
        mqtt_publish(settings, good + BAD)
        deadline = time.monotonic() + 60
        while hot_count(conn) < sum(expected.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemon.stop()
        time.sleep(0.5)
        stop.set()
        worker.join(30)
        consumer.close()
    assert daemon.ingest.stats.received == len(good) + len(BAD)
    assert hot_count(conn) == sum(expected.values())

    with TestClient(create_app(settings)) as client:
        hot_answers = {}
        for tenant, devices in DEVICES.items():
            total = 0
            for device in devices:
                body = query(client, keys[tenant], device)
                assert body["lake_days"] == []
                total += body["count"]
                hot_answers[(tenant, device)] = body["points"]
            assert total == expected[tenant]
        # The same device id in another tenant: each key sees only its own tenant's values.
        assert all(p["value"] > 0 for p in hot_answers[("acme", "motor-1")])
        assert all(p["value"] < 0 for p in hot_answers[("globex", "motor-1")])
        assert query(client, keys["globex"], "tank-1")["count"] == 0
        denied = client.get(
            "/api/query/telemetry",
            params={
                "device_id": "motor-1",
                "start": "2026-11-26T00:00:00Z",
                "end": "2026-11-27T00:00:00Z",
                "tenant_id": "acme",
            },
            headers={"X-API-Key": keys["globex"]},
        )
        assert denied.status_code == 404
        assert denied.headers["content-type"] == "application/problem+json"

        materialize_day(settings, list(DEVICES), DAY)

        for tenant, devices in DEVICES.items():
            for device in devices:
                body = query(client, keys[tenant], device)
                assert body["lake_days"] == [DAY.isoformat()]
                assert body["points"] == hot_answers[(tenant, device)]  # identical answers from the lake

        one = query(
            client,
            keys["acme"],
            "motor-1",
            metric="temperature",
            start="2026-11-26T10:00:00Z",
            end="2026-11-26T10:00:01Z",
        )
        assert [(p["metric"], p["value"]) for p in one["points"]] == [("temperature", 20.0)]

    dlq = drain_topic(settings.kafka_bootstrap, settings.dlq_topic)
    assert len(dlq) == len(BAD)
    assert sorted(m.value() for m in dlq) == sorted(p for _, p in BAD)
    reasons = [dict(m.headers())["reason"].decode() for m in dlq]
    assert all(reasons), reasons
    assert any("non-numeric" in r for r in reasons) and any("unknown device" in r for r in reasons)
