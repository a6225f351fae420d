"""The schema registry through the REST API on the real database: versions, compatibility, force, validation."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
from sensormine.schemas.validation import CompiledSchema
from sensormine.settings import Settings
from sensormine.telemetry.payload import parse_device_payload
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
V1: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ts": {"type": "string"},
        "values": {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": -40, "maximum": 50},
                "humidity": {"type": "number", "minimum": 0, "maximum": 100},
            },
            "required": ["temperature"],
        },
    },
    "required": ["ts", "values"],
}


def v2() -> dict[str, Any]:
    """Compatible with V1: an optional metric added, a range widened."""
    d = copy.deepcopy(V1)
    d["properties"]["values"]["properties"]["pressure"] = {"type": "number"}
    d["properties"]["values"]["properties"]["temperature"]["maximum"] = 60
    return d


def breaking() -> dict[str, Any]:
    """Incompatible with v2: humidity removed, temperature narrowed."""
    d = v2()
    del d["properties"]["values"]["properties"]["humidity"]
    d["properties"]["values"]["properties"]["temperature"]["maximum"] = 40
    return d


@pytest.fixture
def db(conn: psycopg.Connection) -> psycopg.Connection:
    conn.autocommit = True
    return conn


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def new_tenant(conn: psycopg.Connection, parent: str | None = None) -> str:
    tenant_id = f"t{uuid.uuid4().hex[:10]}"
    create_tenant(conn, tenant_id, parent_id=parent, plan=None if parent else "enterprise")
    return tenant_id


def key_for(conn: psycopg.Connection, tenant_id: str, role: str = "operator") -> dict[str, str]:
    return {"X-API-Key": create_api_key(conn, tenant_id, role, ("read", "write"), role=role)}


def test_versions_compatibility_and_force(db: psycopg.Connection, client: TestClient) -> None:
    tenant = new_tenant(db)
    op, admin = key_for(db, tenant), key_for(db, tenant, "tenant_admin")
    assert client.get("/api/schemas", headers=op).json() == {"items": [], "next_cursor": None}
    missing = client.get("/api/schemas/thermo", headers=op)
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert "POST /api/schemas/thermo" in missing.json()["detail"]

    first = client.post("/api/schemas/thermo", json={"definition": V1}, headers=op)
    assert first.status_code == 201, first.text
    assert first.headers["location"] == "/api/schemas/thermo/versions/1"
    assert (first.json()["version"], first.json()["forced"], first.json()["definition"]) == (1, False, V1)
    second = client.post("/api/schemas/thermo", json={"definition": v2()}, headers=op)
    assert second.status_code == 201 and second.json()["version"] == 2

    refused = client.post("/api/schemas/thermo", json={"definition": breaking()}, headers=op)
    assert refused.status_code == 409 and refused.headers["content-type"] == PROBLEM
    problem = refused.json()
    assert problem["against_version"] == 2 and len(problem["problems"]) == 2
    assert "removes /properties/values/properties/humidity" in problem["problems"]
    assert any(p.startswith("narrows the range of temperature") for p in problem["problems"])
    assert "force" in problem["detail"] and "/compatibility" in problem["detail"]
    not_admin = client.post("/api/schemas/thermo", json={"definition": breaking(), "force": True}, headers=op)
    assert not_admin.status_code == 403 and "tenant_admin" in not_admin.json()["detail"]
    assert not_admin.json()["problems"] == problem["problems"]
    forced = client.post("/api/schemas/thermo", json={"definition": breaking(), "force": True}, headers=admin)
    assert forced.status_code == 201, forced.text
    assert (forced.json()["version"], forced.json()["forced"]) == (3, True)
    assert forced.json()["problems"] == problem["problems"]
    # force on a compatible version is simply a registration, for anyone who may write.
    assert (
        client.post("/api/schemas/thermo", json={"definition": breaking(), "force": True}, headers=op).json()["forced"]
        is False
    )

    invalid = client.post("/api/schemas/thermo", json={"definition": {"type": 5}}, headers=op)
    assert invalid.status_code == 422 and "not a valid JSON Schema" in invalid.json()["detail"]
    bounds = {"properties": {"values": {"properties": {"t": {"maximum": "hot"}}}}}
    assert client.post("/api/schemas/thermo", json={"definition": bounds}, headers=op).status_code == 422
    assert client.post("/api/schemas/a b", json={"definition": V1}, headers=op).status_code == 422
    assert client.post("/api/schemas/thermo", json={"schema": V1}, headers=op).status_code == 422

    assert client.get("/api/schemas/thermo", headers=op).json()["version"] == 4
    page1 = client.get("/api/schemas/thermo/versions?limit=3", headers=op).json()
    assert [v["version"] for v in page1["items"]] == [1, 2, 3] and page1["next_cursor"]
    page2 = client.get(f"/api/schemas/thermo/versions?limit=3&cursor={page1['next_cursor']}", headers=op).json()
    assert [v["version"] for v in page2["items"]] == [4] and page2["next_cursor"] is None
    assert client.get("/api/schemas/thermo/versions/2", headers=op).json()["definition"] == v2()
    assert client.get("/api/schemas/thermo/versions/9", headers=op).status_code == 404
    assert client.get("/api/schemas/thermo/versions/0", headers=op).status_code == 422
    assert client.get("/api/schemas/ghost/versions", headers=op).status_code == 404

    [summary] = client.get("/api/schemas", headers=op).json()["items"]
    assert (summary["device_type"], summary["latest_version"], summary["versions"], summary["devices"]) == (
        "thermo",
        4,
        4,
        0,
    )

    # Candidates are checked without registering anything.
    check = client.post("/api/schemas/thermo/compatibility", json={"definition": V1}, headers=op).json()
    assert check["compatible"] is False and check["against_version"] == 4
    assert check["problems"] == ["removes /properties/values/properties/pressure"]
    ok = client.post("/api/schemas/thermo/compatibility", json={"definition": v2()}, headers=op).json()
    assert ok == {
        "tenant_id": tenant,
        "device_type": "thermo",
        "compatible": True,
        "against_version": 4,
        "problems": [],
    }
    fresh = client.post("/api/schemas/newtype/compatibility", json={"definition": V1}, headers=op).json()
    assert (fresh["compatible"], fresh["against_version"]) == (True, None)
    bad = client.post("/api/schemas/thermo/compatibility", json={"definition": {"type": 5}}, headers=op)
    assert bad.status_code == 422
    assert client.get("/api/schemas/thermo", headers=op).json()["version"] == 4

    audit = db.execute(
        "SELECT action, target_id, detail FROM audit_log WHERE tenant_id = %s ORDER BY id", (tenant,)
    ).fetchall()
    assert [(a, t) for a, t, _ in audit] == [("schema.register", f"thermo/v{n}") for n in (1, 2, 3, 4)]
    assert audit[2][2]["forced"] is True and audit[2][2]["problems"] == problem["problems"]
    assert audit[0][2]["forced"] is False


def test_validate_sample_like_ingest(db: psycopg.Connection, client: TestClient) -> None:
    tenant = new_tenant(db)
    h = key_for(db, tenant, "viewer")
    writer = key_for(db, tenant)
    assert client.post("/api/schemas/thermo", json={"definition": V1}, headers=writer).status_code == 201
    assert client.post("/api/schemas/thermo", json={"definition": v2()}, headers=writer).status_code == 201

    def validate(payload: Any, **extra: Any) -> dict[str, Any]:
        resp = client.post("/api/schemas/thermo/validate", json={"payload": payload, **extra}, headers=h)
        assert resp.status_code == 200, resp.text
        return resp.json()

    good = validate({"ts": 1_764_115_200_000, "values": {"temperature": 21.5}})  # epoch ms: ingest makes it ISO
    assert (good["valid"], good["version"], good["items"], good["errors"]) == (True, 2, 1, [])

    hot = {"ts": "2026-11-26T00:00:11Z", "values": {"temperature": 55.5}}
    assert validate(hot)["valid"] is True  # v2 allows up to 60
    old = validate(hot, version=1)
    assert old["version"] == 1 and old["errors"] == [
        {
            "index": None,
            "pointer": "/values/temperature",
            "message": "55.5 is greater than the maximum of 50",
            "stage": "schema",
        }
    ]
    # The consumer's verdict on the same readings names the same pointer and message.
    schema = CompiledSchema(tenant, "thermo", 1, V1)
    violation = schema.check_readings(parse_device_payload(orjson.dumps(hot), tenant, "d", 0))
    assert violation is not None and (violation.pointer, violation.message) == (
        old["errors"][0]["pointer"],
        old["errors"][0]["message"],
    )

    batch = validate(
        [
            {"ts": "2026-11-26T00:00:00Z", "values": {"temperature": 20}},
            {"ts": "yesterday", "values": {"temperature": 20}},
            {"ts": "2026-11-26T00:00:02Z", "values": {"humidity": 120}},
            {"ts": "2026-11-26T00:00:03Z", "values": {"temperature": "warm"}},
        ]
    )
    assert batch["valid"] is False and batch["items"] == 4
    assert [(e["index"], e["pointer"], e["stage"]) for e in batch["errors"]] == [
        (1, "/1/ts", "payload"),
        (2, "/2/values", "schema"),
        (2, "/2/values/humidity", "schema"),
        (3, "/3/values/temperature", "payload"),
    ]
    assert "'temperature' is a required property" in batch["errors"][1]["message"]
    assert "greater than the maximum of 100" in batch["errors"][2]["message"]
    assert validate("not a payload")["errors"][0]["stage"] == "payload"

    assert (
        client.post("/api/schemas/thermo/validate", json={"payload": hot, "version": 7}, headers=h).status_code == 404
    )
    assert client.post("/api/schemas/ghost/validate", json={"payload": hot}, headers=h).status_code == 404


def test_delete_tenancy_and_permissions(db: psycopg.Connection, client: TestClient) -> None:
    parent = new_tenant(db)
    child = new_tenant(db, parent=parent)
    sibling = new_tenant(db, parent=parent)
    hp, hc, hs = key_for(db, parent), key_for(db, child), key_for(db, sibling)
    viewer = key_for(db, parent, "viewer")
    for device_type in ("oven", "press", "thermo"):
        assert client.post(f"/api/schemas/{device_type}", json={"definition": V1}, headers=hp).status_code == 201
    create_device(db, parent, "t-1", device_type="thermo")

    page = client.get("/api/schemas?limit=2", headers=viewer).json()
    assert [t["device_type"] for t in page["items"]] == ["oven", "press"]
    rest = client.get(f"/api/schemas?limit=2&cursor={page['next_cursor']}", headers=viewer).json()
    assert [(t["device_type"], t["devices"]) for t in rest["items"]] == [("thermo", 1)] and rest["next_cursor"] is None

    # Viewers read, check and validate, but do not change.
    assert client.get("/api/schemas/thermo", headers=viewer).status_code == 200
    assert client.post("/api/schemas/x/compatibility", json={"definition": V1}, headers=viewer).status_code == 200
    denied = client.post("/api/schemas/thermo", json={"definition": v2()}, headers=viewer)
    assert denied.status_code == 403 and "schemas:write" in denied.json()["detail"]
    assert client.delete("/api/schemas/thermo", headers=viewer).status_code == 403

    # A type still in use is kept.
    busy = client.delete("/api/schemas/thermo", headers=hp)
    assert busy.status_code == 409 and busy.json()["devices"] == 1 and busy.json()["examples"] == ["t-1"]
    assert "PATCH /api/devices" in busy.json()["detail"]
    assert client.delete("/api/schemas/oven", headers=hp).status_code == 204
    assert client.get("/api/schemas/oven", headers=hp).status_code == 404
    assert client.delete("/api/schemas/oven", headers=hp).status_code == 404
    again = client.post("/api/schemas/oven", json={"definition": v2()}, headers=hp)
    assert again.json()["version"] == 1  # a deleted type starts over
    actions = [
        r[0] for r in db.execute("SELECT action FROM audit_log WHERE tenant_id = %s ORDER BY id", (parent,)).fetchall()
    ]
    assert actions == ["schema.register"] * 3 + ["schema.delete", "schema.register"]

    # Sub-tenants: the parent manages its child's schemas by naming it; nobody else sees them.
    made = client.post(f"/api/schemas/thermo?tenant_id={child}", json={"definition": V1}, headers=hp)
    assert made.status_code == 201 and made.headers["location"] == f"/api/schemas/thermo/versions/1?tenant_id={child}"
    assert client.get("/api/schemas/thermo", headers=hc).json()["tenant_id"] == child
    assert client.get(f"/api/schemas/thermo?tenant_id={parent}", headers=hc).status_code == 404
    assert client.get(f"/api/schemas/thermo?tenant_id={child}", headers=hs).status_code == 404
    assert client.get("/api/schemas/thermo", headers=hs).status_code == 404
    assert (
        client.post(f"/api/schemas/thermo?tenant_id={child}", json={"definition": v2()}, headers=hs).status_code == 404
    )
    assert client.delete(f"/api/schemas/thermo?tenant_id={child}", headers=hs).status_code == 404
    assert client.get("/api/schemas/thermo/versions", headers=hc).json()["items"][0]["version"] == 1
