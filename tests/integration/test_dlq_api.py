"""`GET /api/dlq` and `POST /api/dlq/replay` on real Kafka and PostgreSQL: tenant isolation, scopes, replay."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.clients.kafka import ensure_topics
from sensormine.clients.mqtt import telemetry_topic
from sensormine.identity.api_keys import create_api_key
from sensormine.ingest.sinks import KafkaSink
from sensormine.reading import datetime_to_us
from sensormine.settings import Settings
from sensormine.telemetry.payload import decode_envelope
from serving.main import create_app
from tests.factories import drain_topic, make_tenant

pytestmark = pytest.mark.integration

TENANTS = {"parent": "p1", "child": "c1", "sibling": "s1"}


def payload(device: str) -> bytes:
    return orjson.dumps({"ts": "2026-11-26T10:00:00Z", "values": {"temperature": float(len(device))}})


@pytest.fixture
def keys(conn: psycopg.Connection, settings: Settings) -> dict[str, str]:
    """API keys of a parent and its two sub-tenants (each has one dead letter), and a read-only one."""
    made = {
        "parent": make_tenant(conn, "parent", ["p1"]),
        "child": make_tenant(conn, "child", ["c1"], parent_id="parent"),
        "sibling": make_tenant(conn, "sibling", ["s1"], parent_id="parent"),
    }
    made["child-ro"] = create_api_key(conn, "child", "read only", scopes=("read",))
    ensure_topics([settings.dlq_topic, *(settings.telemetry_topic(t) for t in TENANTS)], settings=settings)
    sink = KafkaSink(settings)
    for tenant, device in TENANTS.items():
        # As the MQTT daemon rejects a device that was not registered yet (it is now: the "device fix").
        reason = f"unknown device {device!r} of tenant {tenant!r}"
        sink.reject("mqtt", telemetry_topic(tenant, device), reason, payload(device), tenant, device)
    sink.reject("mqtt", "sensormine/nobody", "topic does not match", b"{}")  # names no tenant: operators only
    assert sink.flush(30) == 0
    return made


def listed(client: TestClient, key: str, **params: str) -> list[dict]:
    resp = client.get("/api/dlq", params=params, headers={"X-API-Key": key})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["count"] == len(body["items"])
    return body["items"]


def replay(client: TestClient, key: str, **body: object):
    return client.post("/api/dlq/replay", json=body, headers={"X-API-Key": key})


def test_callers_see_the_dead_letters_of_their_own_tenants_only(settings: Settings, keys: dict[str, str]) -> None:
    with TestClient(create_app(settings)) as client:
        mine = listed(client, keys["child"])
        assert [(e["tenant_id"], e["device_id"], e["status"]) for e in mine] == [("child", "c1", "pending")]
        entry = mine[0]
        assert entry["reason"] == "unknown device 'c1' of tenant 'child'"
        assert entry["source"] == "mqtt" and entry["origin"] == "sensormine/child/c1/telemetry"
        assert entry["payload_text"] == payload("c1").decode()
        assert base64.b64decode(entry["payload_base64"]) == payload("c1")
        assert entry["id"].startswith(f"{settings.dlq_topic}/")

        assert sorted(e["tenant_id"] for e in listed(client, keys["parent"])) == ["child", "parent", "sibling"]
        assert [e["tenant_id"] for e in listed(client, keys["parent"], tenant_id="sibling")] == ["sibling"]
        assert [e["tenant_id"] for e in listed(client, keys["sibling"])] == ["sibling"]
        assert listed(client, keys["parent"], reason="DEVICE 'p1'")[0]["device_id"] == "p1"
        assert listed(client, keys["parent"], device_id="nope") == []

        for key, other in ((keys["child"], "parent"), (keys["child"], "sibling"), (keys["sibling"], "child")):
            resp = client.get("/api/dlq", params={"tenant_id": other}, headers={"X-API-Key": key})
            assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"
        assert client.get("/api/dlq").status_code == 401


def test_replay_needs_the_write_scope_and_touches_only_the_callers_dead_letters(
    settings: Settings, keys: dict[str, str]
) -> None:
    with TestClient(create_app(settings)) as client:
        ids = {e["tenant_id"]: e["id"] for e in listed(client, keys["parent"])}

        refused = replay(client, keys["child-ro"], ids=[ids["child"]])
        assert refused.status_code == 403 and "dlq:write" in refused.json()["detail"]

        dry = replay(client, keys["child"], dry_run=True).json()
        assert dry["counts"] == {"would_resubmit": 1}

        done = replay(client, keys["child"], ids=[ids["sibling"], ids["child"], "elsewhere.dlq/0/1"])
        assert done.status_code == 200, done.text
        outcomes = {o["id"]: o for o in done.json()["outcomes"]}
        assert outcomes[ids["child"]]["outcome"] == "resubmitted" and outcomes[ids["child"]]["readings"] == 1
        # Another tenant's dead letter, and an id of another topic, are simply not found.
        assert outcomes[ids["sibling"]]["outcome"] == outcomes["elsewhere.dlq/0/1"]["outcome"] == "not_found"

        again = replay(client, keys["child"], ids=[ids["child"]]).json()
        assert again["counts"] == {"already_replayed": 1}
        assert replay(client, keys["child"]).json()["counts"] == {}  # nothing of the child's is pending

        assert [e["id"] for e in listed(client, keys["child"], status="replayed")] == [ids["child"]]
        assert sorted(e["tenant_id"] for e in listed(client, keys["parent"], status="pending")) == ["parent", "sibling"]

    # The child's readings went back to the child's topic, once, marked as a replay.
    [sent] = drain_topic(settings.kafka_bootstrap, settings.telemetry_topic("child"), idle_s=1.0)
    assert dict(sent.headers())["replay_of"] == ids["child"].encode()
    [reading] = decode_envelope(sent.value())
    assert (reading.tenant_id, reading.device_id, reading.metric, reading.value) == ("child", "c1", "temperature", 2.0)
    assert reading.ts == datetime_to_us(datetime(2026, 11, 26, 10, tzinfo=UTC))
    assert drain_topic(settings.kafka_bootstrap, settings.telemetry_topic("sibling"), idle_s=0.5) == []
