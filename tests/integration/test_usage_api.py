"""GET /api/usage and /api/usage/events: a tenant's standing against its plan, through PostgreSQL and Redis."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.metering.events import record_tenant_event
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(conn: psycopg.Connection) -> dict[str, str]:
    made = {
        "parent": make_tenant(conn, "parent", ["p1", "p2"], plan="free", role="viewer"),
        "child": make_tenant(conn, "child", ["c1"], parent_id="parent", role="viewer"),
        "other": make_tenant(conn, "other", ["o1"], plan="pro", role="viewer"),
    }
    conn.commit()
    return made


def test_usage_counts_calls_and_devices_of_the_quota_group(settings: Settings, keys: dict[str, str]) -> None:
    with TestClient(create_app(settings)) as client:
        for _ in range(5):
            assert client.get("/api/devices/status", headers={"X-API-Key": keys["child"]}).status_code == 200
        for _ in range(3):
            assert client.get("/api/devices/status", headers={"X-API-Key": keys["parent"]}).status_code == 200
    # The app flushed its counts on shutdown; a new process reads them from the usage table.
    with TestClient(create_app(settings)) as client:
        body = client.get("/api/usage", headers={"X-API-Key": keys["parent"]}).json()
        assert body["plan"] == "free" and body["quota_tenant"] == "parent"
        assert body["devices"] == {"used": 3, "limit": 10}
        by_tenant = {t["tenant_id"]: t for t in body["by_tenant"]}
        assert by_tenant["child"]["api_calls"] == 5 and by_tenant["child"]["devices"] == 1
        assert by_tenant["parent"]["api_calls"] == 3
        # The group total includes this call and the parent's previous ones, live from the counter.
        assert body["api_calls"]["used"] >= 9 and body["api_calls"]["limit"] == 10_000
        child = client.get("/api/usage", headers={"X-API-Key": keys["child"]}).json()
        assert child["quota_tenant"] == "parent" and [t["tenant_id"] for t in child["by_tenant"]] == ["child"]
        # Neither the parent's usage nor another tenant's is readable from below or beside.
        for key, tenant in ((keys["child"], "parent"), (keys["other"], "parent"), (keys["parent"], "other")):
            resp = client.get("/api/usage", params={"tenant_id": tenant}, headers={"X-API-Key": key})
            assert resp.status_code == 404 and resp.headers["content-type"] == "application/problem+json"
        bad = client.get("/api/usage", params={"month": "2026-13"}, headers={"X-API-Key": keys["parent"]})
        assert bad.status_code == 422 and "YYYY-MM" in bad.json()["detail"]


def test_events_are_listed_newest_first_per_tenant(
    settings: Settings, conn: psycopg.Connection, keys: dict[str, str]
) -> None:
    with conn.transaction():
        for i in range(3):
            record_tenant_event(conn, "parent", "quota.api_calls.warning", {"n": i}, dedupe_key=f"k{i}")
        record_tenant_event(conn, "other", "quota.api_calls.warning", {"n": 9}, dedupe_key="o")
    with TestClient(create_app(settings)) as client:
        first = client.get("/api/usage/events", params={"limit": 2}, headers={"X-API-Key": keys["parent"]}).json()
        assert [e["data"]["n"] for e in first["items"]] == [2, 1] and first["next_cursor"]
        rest = client.get(
            "/api/usage/events",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers={"X-API-Key": keys["parent"]},
        ).json()
        assert [e["data"]["n"] for e in rest["items"]] == [0] and rest["next_cursor"] is None
        denied = client.get("/api/usage/events", params={"tenant_id": "parent"}, headers={"X-API-Key": keys["other"]})
        assert denied.status_code == 404
