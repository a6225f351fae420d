"""The API's contract on a real database: authentication, tenancy, problem+json errors, probes, OpenAPI."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.clients.hotstore import HotStoreWriter
from sensormine.settings import Settings
from serving.main import create_app
from serving.metrics import metrics_token
from tests.factories import make_tenant, readings

pytestmark = pytest.mark.integration

DAY = {"start": "2026-11-26T00:00:00Z", "end": "2026-11-27T00:00:00Z"}


@pytest.fixture
def keys(conn: psycopg.Connection) -> dict[str, str]:
    made = {
        "parent": make_tenant(conn, "parent", ["p1"]),
        "child": make_tenant(conn, "child", ["c1"], parent_id="parent"),
        "sibling": make_tenant(conn, "sibling", ["s1"], parent_id="parent"),
    }
    HotStoreWriter(conn).write(readings("parent", "p1", 3) + readings("child", "c1", 4) + readings("sibling", "s1", 5))
    conn.commit()
    return made


def get(client: TestClient, key: str | None, **params: str):
    headers = {"X-API-Key": key} if key else {}
    return client.get("/api/query/telemetry", params={**DAY, **params}, headers=headers)


def assert_problem(resp, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["status"] == status and fragment in body["detail"]


def test_probes_and_openapi(settings: Settings) -> None:
    token = "scrape-" + "x" * 40
    with TestClient(create_app(settings.model_copy(update={"metrics_token": token}))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}
        spec = client.get("/openapi.json").json()
        assert "/api/query/telemetry" in spec["paths"]
        assert client.get("/docs").status_code == 200
        client.get("/api/devices/nope/status")  # a 401, counted under its route template
        assert client.get("/metrics").status_code == 401  # not without the scrape token
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'sensormine_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in metrics.text
        assert 'route="/api/devices/{device_id}/status",status="401"' in metrics.text
        assert "sensormine_db_pool_connections" in metrics.text


def test_metrics_token_is_generated_in_development_and_required_elsewhere(settings: Settings) -> None:
    dev = settings.model_copy(update={"env": "dev"})
    token = metrics_token(dev)
    assert token and (settings.state_dir / "metrics-token").read_text().strip() == token
    with TestClient(create_app(dev)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    prod = settings.model_copy(update={"env": "prod", "jwt_secret": "p" * 40})
    with TestClient(create_app(prod)) as client:
        assert client.get("/metrics").status_code == 404
    with TestClient(create_app(prod.model_copy(update={"metrics_token": "scrape-me"}))) as client:
        assert client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).status_code == 200


def test_parent_reads_children_never_the_reverse(settings: Settings, keys: dict[str, str]) -> None:
    with TestClient(create_app(settings)) as client:
        assert get(client, keys["parent"], device_id="c1", tenant_id="child").json()["count"] == 8
        assert get(client, keys["parent"], device_id="p1").json()["count"] == 6
        assert get(client, keys["child"], device_id="c1").json()["count"] == 8
        assert_problem(get(client, keys["child"], device_id="p1", tenant_id="parent"), 404, "not found")
        assert_problem(get(client, keys["child"], device_id="s1", tenant_id="sibling"), 404, "not found")
        # Without naming the tenant, another tenant's device id simply has no points for the caller.
        assert get(client, keys["child"], device_id="s1").json()["count"] == 0


def test_errors_are_problem_json(settings: Settings, keys: dict[str, str]) -> None:
    small = settings.model_copy(update={"query_max_points": 5})
    with TestClient(create_app(small)) as client:
        assert_problem(get(client, None, device_id="p1"), 401, "X-API-Key")
        assert_problem(get(client, "smk_nope_nope", device_id="p1"), 401, "unknown or revoked")
        assert_problem(get(client, keys["parent"], device_id="p1", start="yesterday"), 422, "invalid")
        assert_problem(get(client, keys["parent"], device_id="p1", start="2026-11-26T00:00:00"), 422, "invalid")
        assert_problem(
            get(client, keys["parent"], device_id="p1", start=DAY["end"], end=DAY["start"]), 422, "end must be after"
        )
        assert_problem(get(client, keys["parent"], device_id="p1"), 413, "narrow the time range")
        assert get(client, keys["parent"], device_id="p1", metric="pressure").json()["count"] == 3
