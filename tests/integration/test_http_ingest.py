"""POST /api/ingest on real services: device keys, JSON and CSV batches, rejects in the DLQ."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.clients.kafka import ensure_topics
from sensormine.devices.registry import create_device
from sensormine.settings import Settings
from sensormine.telemetry.payload import decode_envelope
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app
from tests.factories import DAY_US, drain_topic

pytestmark = pytest.mark.integration

T0 = "2026-11-26T00:00:00Z"


def device_key(conn: psycopg.Connection, tenant_id: str, device_id: str) -> str:
    create_tenant(conn, tenant_id)
    return create_device(conn, tenant_id, device_id)[1]


def post(client: TestClient, key: str | None, body: Any, content_type: str = "application/json"):
    headers = {"content-type": content_type}
    if key:
        headers["X-Device-Key"] = key
    return client.post("/api/ingest", content=body, headers=headers)


def test_in_process_batch_lands_in_the_hot_store_and_rejects_in_dead_letters(
    conn: psycopg.Connection, settings: Settings
) -> None:
    in_process = settings.model_copy(update={"kafka_bootstrap": None})
    key = device_key(conn, "acme", "press-1")
    items = [
        {"ts": T0, "values": {"temp": 20.5, "rpm": 1500}},
        {"ts": T0, "values": {"temp": "hot"}},
        {"ts": "2026-11-26T00:00:01Z", "values": {"temp": 21.0}},
    ]
    with TestClient(create_app(in_process)) as client:
        resp = post(client, key, orjson.dumps(items))
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "tenant_id": "acme",
            "device_id": "press-1",
            "items": 3,
            "accepted_items": 2,
            "rejected_items": 1,
            "readings": 3,
            "errors": [{"index": 1, "reason": "non-numeric value of type str", "pointer": "/1/values/temp"}],
        }
        csv = f"ts,metric,value\n{T0},flow,3.25\n{T0},flow,oops\n".encode()
        resp = post(client, key, csv, "text/csv; charset=utf-8")
        assert resp.json()["readings"] == 1 and resp.json()["rejected_items"] == 1
        # Sending the same batch again changes nothing: readings are deduplicated.
        assert post(client, key, orjson.dumps(items)).status_code == 200

    rows = conn.execute("SELECT tenant_id, device_id, metric, ts, value FROM telemetry ORDER BY metric, ts").fetchall()
    assert [(r[2], r[4]) for r in rows] == [("flow", 3.25), ("rpm", 1500.0), ("temp", 20.5), ("temp", 21.0)]
    assert {(r[0], r[1]) for r in rows} == {("acme", "press-1")}
    dead = conn.execute("SELECT source, origin, reason, payload FROM dead_letters ORDER BY id").fetchall()
    assert [(d[0], d[1]) for d in dead] == [
        ("http", "http:acme/press-1#1"),
        ("http", "http:acme/press-1#1"),
        ("http", "http:acme/press-1#1"),
    ]
    assert orjson.loads(bytes(dead[0][3])) == items[1] and "(at /1/values/temp)" in dead[0][2]
    assert bytes(dead[1][3]) == f"ts,metric,value\n{T0},flow,oops".encode()


def test_kafka_batch_reaches_the_topic_and_the_dlq(conn: psycopg.Connection, settings: Settings) -> None:
    assert settings.kafka_bootstrap
    key = device_key(conn, "acme", "press-1")
    ensure_topics([settings.telemetry_topic("acme"), settings.dlq_topic], settings=settings)
    with TestClient(create_app(settings)) as client:
        resp = post(client, key, f"ts,temp,rpm\n{T0},20.5,1500\n2026-11-26T00:00:01Z,21,\n".encode(), "text/csv")
        assert resp.status_code == 200 and resp.json()["readings"] == 3
        bad = post(client, key, b"{not json")
        assert bad.status_code == 400 and bad.headers["content-type"] == "application/problem+json"
        assert "dead-letter queue" in bad.json()["detail"]

    messages = drain_topic(settings.kafka_bootstrap, settings.telemetry_topic("acme"))
    readings = [r for m in messages for r in decode_envelope(m.value())]
    assert sorted((r.metric, r.ts, r.value) for r in readings) == [
        ("rpm", DAY_US, 1500.0),
        ("temp", DAY_US, 20.5),
        ("temp", DAY_US + 1_000_000, 21.0),
    ]
    assert {m.key() for m in messages} == {b"press-1"}
    [dlq] = drain_topic(settings.kafka_bootstrap, settings.dlq_topic)
    headers = {k: v.decode() for k, v in dlq.headers()}
    assert dlq.value() == b"{not json"
    assert headers["source"] == "http" and headers["device_id"] == "press-1"
    assert headers["reason"].startswith("malformed JSON")


def test_bad_requests_get_problem_answers(conn: psycopg.Connection, settings: Settings) -> None:
    key = device_key(conn, "acme", "press-1")
    small = settings.model_copy(update={"http_ingest_max_bytes": 100, "kafka_bootstrap": None})
    with TestClient(create_app(small)) as client:
        for resp, status, fragment in [
            (post(client, None, b"{}"), 401, "X-Device-Key"),
            (post(client, "smd_unknown", b"{}"), 401, "unknown"),
            (post(client, "smk_api_key_is_not_a_device_key", b"{}"), 401, "unknown"),
            (post(client, key, b"x" * 101), 413, "larger than 100"),
            (post(client, key, b"<xml/>", "application/xml"), 415, "application/xml"),
            # Chunked, without a Content-Length: refused from the stream (serving/bodies.py).
            (post(client, key, iter([b"[" + b" " * 60, b" " * 60 + b"]"])), 413, "larger than 100"),
        ]:
            assert resp.status_code == status, resp.text
            assert resp.headers["content-type"] == "application/problem+json"
            assert fragment in resp.json()["detail"]
        assert "/api/ingest" in client.get("/openapi.json").json()["paths"]
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_in_process_path_validates_against_the_device_schema(conn: psycopg.Connection, settings: Settings) -> None:
    from sensormine.schemas.store import register_schema

    create_tenant(conn, "acme")
    key = create_device(conn, "acme", "oven-1", device_type="oven")[1]
    schema = {"type": "object", "properties": {"values": {"properties": {"temp": {"type": "number", "maximum": 300}}}}}
    register_schema(conn, "acme", "oven", schema)
    in_process = settings.model_copy(update={"kafka_bootstrap": None})
    with TestClient(create_app(in_process)) as client:
        ok = post(client, key, orjson.dumps({"ts": T0, "values": {"temp": 250}}))
        hot = post(client, key, orjson.dumps({"ts": "2026-11-26T00:00:01Z", "values": {"temp": 350}}))
    assert ok.status_code == hot.status_code == 200
    assert conn.execute("SELECT value FROM telemetry").fetchall() == [(250.0,)]
    [(reason,)] = conn.execute("SELECT reason FROM dead_letters").fetchall()
    assert reason.startswith("schema oven v1: 350") and "(at /values/temp" in reason
