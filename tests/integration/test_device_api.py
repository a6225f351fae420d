"""Device status and profiles through the API, on the real database."""

from __future__ import annotations

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.devices.registry import create_device
from sensormine.devices.status import StatusTracker, device_statuses
from sensormine.identity.api_keys import create_api_key
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant

pytestmark = pytest.mark.integration

MODBUS = {"protocol": "modbus", "host": "127.0.0.1", "points": [{"metric": "p", "address": 0, "data_type": "float32"}]}


def test_status_counts_http_ingest_and_goes_offline(conn: psycopg.Connection, settings: Settings) -> None:
    api_key = make_tenant(conn, "acme", ["quiet"])
    _, device_key = create_device(conn, "acme", "press-1")
    app_settings = settings.model_copy(update={"kafka_bootstrap": None, "device_offline_after_s": 300.0})
    good = orjson.dumps([{"ts": "2026-11-26T00:00:00Z", "values": {"t": 1, "p": 2}}, {"ts": "x", "values": {}}])
    with TestClient(create_app(app_settings)) as client:
        for _ in range(2):
            resp = client.post("/api/ingest", content=good, headers={"X-Device-Key": device_key})
            assert resp.status_code == 200
    # The app flushed its tallies when it stopped; a new app reads them.
    with TestClient(create_app(app_settings)) as client:
        statuses = {s["device_id"]: s for s in client.get("/api/devices/status", headers={"X-API-Key": api_key}).json()}
        press = statuses["press-1"]
        assert (press["messages"], press["readings"], press["errors"]) == (4, 4, 2)
        assert press["online"] is True and press["last_source"] == "http"
        assert "unparseable timestamp" in press["last_error"]
        assert statuses["quiet"]["online"] is False and statuses["quiet"]["last_seen"] is None
        # Time passes for the device: its last message moves past the offline threshold (no sleeping on a clock).
        conn.execute("UPDATE device_status SET last_seen = last_seen - interval '301 seconds'")
        conn.commit()
        one = client.get("/api/devices/press-1/status", headers={"X-API-Key": api_key}).json()
        assert one["online"] is False and one["messages"] == 4
        assert client.get("/api/devices/ghost/status", headers={"X-API-Key": api_key}).status_code == 404


def test_trackers_add_up_and_skip_unknown_devices(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    a, b = StatusTracker("mqtt"), StatusTracker("opcua")
    a.seen("acme", "d1", 5)
    a.seen("acme", "ghost", 1)
    b.seen("acme", "d1", 2)
    b.error("acme", "d1", "Bad status")
    assert a.flush(conn) == 2 and b.flush(conn) == 1 and a.flush(conn) == 0
    [status] = device_statuses(conn, ["acme"], 60)
    assert (status.messages, status.readings, status.errors, status.last_source) == (3, 7, 1, "opcua")
    assert status.last_error == "Bad status" and status.online


def test_profiles_through_the_api(conn: psycopg.Connection, settings: Settings) -> None:
    key = make_tenant(conn, "acme", ["plc-1"])
    reader = create_api_key(conn, "acme", "ro", scopes=("read",))
    other = make_tenant(conn, "globex", ["plc-9"])
    h = {"X-API-Key": key}
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/devices/plc-1/profile", headers=h).status_code == 404
        bad = client.put("/api/devices/plc-1/profile", json={**MODBUS, "unit_id": 999}, headers=h)
        assert bad.status_code == 422 and "unit_id" in bad.json()["detail"]
        made = client.put("/api/devices/plc-1/profile", json=MODBUS, headers=h)
        assert made.status_code == 200, made.text
        again = client.put("/api/devices/plc-1/profile", json={**MODBUS, "poll_interval_ms": 250}, headers=h).json()
        assert again["revision"] > made.json()["revision"] and again["profile"]["poll_interval_ms"] == 250
        assert (
            client.get("/api/devices/plc-1/profile", headers=h).json()["profile"]["points"][0]["data_type"] == "float32"
        )
        assert client.put("/api/devices/plc-1/profile", json=MODBUS, headers={"X-API-Key": reader}).status_code == 403
        assert client.get("/api/devices/plc-1/profile", headers={"X-API-Key": other}).status_code == 404
        assert client.get("/api/devices/plc-1/profile?tenant_id=acme", headers={"X-API-Key": other}).status_code == 404
        assert client.put("/api/devices/ghost/profile", json=MODBUS, headers=h).status_code == 404
        assert client.delete("/api/devices/plc-1/profile", headers=h).status_code == 204
        assert client.delete("/api/devices/plc-1/profile", headers=h).status_code == 404


def test_tracking_sink_counts_what_daemons_publish(conn: psycopg.Connection, settings: Settings) -> None:
    from sensormine.clients.postgres import INGEST, connect
    from sensormine.devices.status import tracked
    from sensormine.ingest.sinks import DirectSink
    from tests.factories import readings

    make_tenant(conn, "acme", ["plc-1"])
    in_process = settings.model_copy(update={"kafka_bootstrap": None})
    sink = tracked(DirectSink(lambda: connect(in_process, role=INGEST), in_process), in_process)
    sink.publish("acme", "plc-1", "modbus", readings("acme", "plc-1", 3))
    sink.reject("modbus", "modbus:acme/plc-1", "poll timed out", b"", "acme", "plc-1")
    assert sink.flush(10) == 0
    sink.close()
    [status] = device_statuses(conn, ["acme"], 60)
    assert (status.messages, status.readings, status.errors) == (2, 6, 1)
    assert status.last_source == "modbus" and status.last_error == "poll timed out"
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (6,)
