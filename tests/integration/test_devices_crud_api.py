"""Devices through the REST API on the real database and broker: register, read, change, delete, keys, CSV import."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.clients.mqtt import MqttConnectError, make_client
from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app

pytestmark = pytest.mark.integration

SAMPLE = orjson.dumps({"ts": "2026-11-26T00:00:00Z", "values": {"temperature": 21.5}})
PROBLEM = "application/problem+json"


@pytest.fixture
def db(conn: psycopg.Connection) -> psycopg.Connection:
    """The test database in autocommit, so what the test sets up is visible to the app at once."""
    conn.autocommit = True
    return conn


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API with the in-process ingest path (no Kafka), so an accepted reading is in the hot store at once."""
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as c:
        yield c


def new_tenant(conn: psycopg.Connection, parent: str | None = None, plan: str | None = "enterprise") -> str:
    """A tenant with a unique id (the broker is shared by every test: device users must not collide)."""
    tenant_id = f"t{uuid.uuid4().hex[:10]}"
    create_tenant(conn, tenant_id, parent_id=parent, plan=None if parent else plan)
    return tenant_id


def key_for(conn: psycopg.Connection, tenant_id: str, role: str = "operator", scopes=("read", "write")) -> dict:
    return {"X-API-Key": create_api_key(conn, tenant_id, role, scopes, role=role)}


def ingest(client: TestClient, device_key: str) -> int:
    return client.post(
        "/api/ingest", content=SAMPLE, headers={"X-Device-Key": device_key, "content-type": "application/json"}
    ).status_code


def audit_actions(conn: psycopg.Connection, tenant_id: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT action, target_id FROM audit_log WHERE tenant_id = %s ORDER BY id", (tenant_id,)
    ).fetchall()
    return [(a, t) for a, t in rows]


def test_register_read_change_delete(db: psycopg.Connection, client: TestClient) -> None:
    tenant = new_tenant(db)
    h = key_for(db, tenant)
    made = client.post(
        "/api/devices",
        json={"id": "press-1", "name": "Press 1", "device_type": "press", "metadata": {"site": "north", "line": 2}},
        headers=h,
    )
    assert made.status_code == 201, made.text
    assert made.headers["location"] == "/api/devices/press-1"
    assert made.headers["cache-control"] == "no-store"
    body = made.json()
    key = body["device_key"]
    assert key.startswith("smd_") and body["mqtt_username"] == f"{tenant}/press-1"
    assert body["key_state"] == "active" and body["broker"] in ("applied", "skipped")
    assert body["metadata"] == {"site": "north", "line": 2} and body["device_type"] == "press"

    # The key works for HTTP ingest, and the reading lands under the device.
    assert ingest(client, key) == 200
    assert db.execute("SELECT tenant_id, device_id, value FROM telemetry").fetchall() == [(tenant, "press-1", 21.5)]

    # The key is never shown again.
    got = client.get("/api/devices/press-1", headers=h)
    assert got.status_code == 200 and "device_key" not in got.json() and key not in got.text
    listed = client.get("/api/devices", headers=h)
    assert key not in listed.text and [d["id"] for d in listed.json()["items"]] == ["press-1"]

    dup = client.post("/api/devices", json={"id": "press-1"}, headers=h)
    assert dup.status_code == 409 and dup.headers["content-type"] == PROBLEM
    assert "already exists" in dup.json()["detail"] and "rotate-key" in dup.json()["detail"]
    bad = client.post("/api/devices", json={"id": "press 1!"}, headers=h)
    assert bad.status_code == 422 and "A-Z" in bad.json()["detail"]
    assert client.post("/api/devices", json={"id": "status"}, headers=h).status_code == 422
    assert client.post("/api/devices", json={"id": "x", "device_type": "a/b"}, headers=h).status_code == 422
    assert client.post("/api/devices", json={"id": "x", "metadata": [1]}, headers=h).status_code == 422
    big = client.post("/api/devices", json={"id": "x", "metadata": {"blob": "x" * 20_000}}, headers=h)
    assert big.status_code == 422 and "16384" in big.json()["detail"]

    patched = client.patch(
        "/api/devices/press-1", json={"name": "Press One", "metadata": {"site": None, "serial": "A7"}}, headers=h
    )
    assert patched.status_code == 200, patched.text
    p = patched.json()
    assert p["name"] == "Press One" and p["metadata"] == {"line": 2, "serial": "A7"} and p["device_type"] == "press"
    assert datetime.fromisoformat(p["updated_at"]) > datetime.fromisoformat(body["updated_at"])
    cleared = client.patch("/api/devices/press-1", json={"device_type": None}, headers=h).json()
    assert cleared["device_type"] is None and cleared["name"] == "Press One"
    assert client.patch("/api/devices/press-1", json={}, headers=h).status_code == 422
    assert client.patch("/api/devices/press-1", json={"metadata": None}, headers=h).status_code == 422
    assert client.patch("/api/devices/press-1", json={"name": None}, headers=h).status_code == 422
    assert client.patch("/api/devices/press-1", json={"colour": "red"}, headers=h).status_code == 422
    assert client.patch("/api/devices/ghost", json={"name": "x"}, headers=h).status_code == 404

    assert client.delete("/api/devices/press-1", headers=h).status_code == 204
    gone = client.get("/api/devices/press-1", headers=h)
    assert gone.status_code == 404 and gone.headers["content-type"] == PROBLEM
    assert client.delete("/api/devices/press-1", headers=h).status_code == 404
    assert ingest(client, key) == 401  # the deleted device's key is dead
    assert db.execute("SELECT count(*) FROM telemetry").fetchone() == (1,)  # its history stays

    assert audit_actions(db, tenant) == [
        ("device.create", "press-1"),
        ("device.update", "press-1"),
        ("device.update", "press-1"),
        ("device.delete", "press-1"),
    ]
    details = db.execute("SELECT detail::text FROM audit_log WHERE tenant_id = %s", (tenant,)).fetchall()
    assert not any("smd_" in d[0] for d in details)
    update = db.execute(
        "SELECT detail FROM audit_log WHERE tenant_id = %s AND action = 'device.update' ORDER BY id LIMIT 1", (tenant,)
    ).fetchone()
    assert update is not None and update[0]["name"] == {"from": "Press 1", "to": "Press One"}


def test_rotate_and_revoke(db: psycopg.Connection, client: TestClient, settings: Settings) -> None:
    tenant = new_tenant(db)
    h = key_for(db, tenant)
    made = client.post("/api/devices", json={"id": "pump-1"}, headers=h).json()
    old = made["device_key"]
    user = made["mqtt_username"]
    assert made["broker"] == ("applied" if settings.mqtt_admin_username else "skipped")
    if made["broker"] == "applied":  # the launcher's Mosquitto: the key is the device's MQTT password
        make_client("t-dev", settings, user, old).disconnect()

    rotated = client.post("/api/devices/pump-1/rotate-key", headers=h)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["device_key"]
    assert new != old and new.startswith("smd_") and rotated.headers["cache-control"] == "no-store"
    assert ingest(client, old) == 401 and ingest(client, new) == 200
    if made["broker"] == "applied":
        with pytest.raises(MqttConnectError):
            make_client("t-dev", settings, user, old, timeout=5)
        make_client("t-dev", settings, user, new).disconnect()

    revoked = client.post("/api/devices/pump-1/revoke-key", headers=h)
    assert revoked.status_code == 200 and revoked.json()["key_state"] == "revoked"
    assert client.get("/api/devices/pump-1", headers=h).json()["key_state"] == "revoked"
    assert ingest(client, new) == 401
    again = client.post("/api/devices/pump-1/rotate-key", headers=h).json()["device_key"]
    assert ingest(client, again) == 200
    assert client.get("/api/devices/pump-1", headers=h).json()["key_state"] == "active"

    assert client.post("/api/devices/ghost/rotate-key", headers=h).status_code == 404
    assert client.post("/api/devices/ghost/revoke-key", headers=h).status_code == 404
    assert [a for a, _ in audit_actions(db, tenant)] == [
        "device.create",
        "device.rotate_key",
        "device.revoke_key",
        "device.rotate_key",
    ]


def test_list_pages_filters_and_sub_tenants(db: psycopg.Connection, client: TestClient) -> None:
    parent = new_tenant(db)
    child = new_tenant(db, parent=parent)
    for i in range(5):
        create_device(db, parent, f"d{i}", device_type="press" if i % 2 else "pump")
    create_device(db, child, "c0", device_type="press")
    h = key_for(db, parent)

    seen, cursor, pages = [], None, 0
    while True:
        page = client.get("/api/devices", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=h)
        assert page.status_code == 200, page.text
        seen += [d["id"] for d in page.json()["items"]]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == ["d0", "d1", "d2", "d3", "d4"] and pages == 3

    presses = client.get("/api/devices", params={"device_type": "press"}, headers=h).json()["items"]
    assert [d["id"] for d in presses] == ["d1", "d3"]
    both = client.get("/api/devices", params={"include_subtenants": True, "device_type": "press"}, headers=h).json()
    expected = sorted([(parent, "d1"), (parent, "d3"), (child, "c0")])  # by tenant, then id
    assert [(d["tenant_id"], d["id"]) for d in both["items"]] == expected
    assert [d["id"] for d in client.get(f"/api/devices?tenant_id={child}", headers=h).json()["items"]] == ["c0"]
    assert client.get("/api/devices", params={"cursor": "bm9wZQ"}, headers=h).status_code == 422
    assert client.get("/api/devices", params={"cursor": "!!"}, headers=h).status_code == 422
    assert client.get("/api/devices", params={"limit": 0}, headers=h).status_code == 422


def test_tenants_see_their_own_and_their_sub_tenants_devices_only(db: psycopg.Connection, client: TestClient) -> None:
    parent = new_tenant(db)
    child = new_tenant(db, parent=parent)
    sibling = new_tenant(db, parent=parent)
    hp, hc, hs = key_for(db, parent), key_for(db, child), key_for(db, sibling)

    # A parent manages its sub-tenant's devices by naming it.
    made = client.post(f"/api/devices?tenant_id={child}", json={"id": "c-1"}, headers=hp)
    assert made.status_code == 201 and made.headers["location"] == f"/api/devices/c-1?tenant_id={child}"
    assert made.json()["tenant_id"] == child
    assert client.get(f"/api/devices/c-1?tenant_id={child}", headers=hp).status_code == 200
    assert client.get("/api/devices/c-1", headers=hc).status_code == 200
    assert client.post("/api/devices", json={"id": "p-1"}, headers=hp).status_code == 201

    # The child never sees its parent, the sibling never sees the child: all answered as not found.
    assert client.get("/api/devices/p-1", headers=hc).status_code == 404
    assert client.get(f"/api/devices/p-1?tenant_id={parent}", headers=hc).status_code == 404
    assert client.get(f"/api/devices?tenant_id={parent}", headers=hc).status_code == 404
    assert client.post(f"/api/devices?tenant_id={parent}", json={"id": "x"}, headers=hc).status_code == 404
    for method, path in [
        ("get", "/api/devices/c-1"),
        ("patch", "/api/devices/c-1"),
        ("delete", "/api/devices/c-1"),
        ("post", "/api/devices/c-1/rotate-key"),
        ("post", "/api/devices/c-1/revoke-key"),
    ]:
        kwargs = {"json": {"name": "stolen"}} if method == "patch" else {}
        own = getattr(client, method)(path, headers=hs, **kwargs)
        named = getattr(client, method)(f"{path}?tenant_id={child}", headers=hs, **kwargs)
        assert (own.status_code, named.status_code) == (404, 404), (method, path)
    assert client.get("/api/devices", headers=hs).json()["items"] == []
    assert client.get("/api/devices?include_subtenants=true", headers=hc).json()["items"][0]["id"] == "c-1"
    assert client.get("/api/devices/c-1", headers=hc).json()["name"] == "c-1"  # untouched by the sibling


def test_readers_cannot_write(db: psycopg.Connection, client: TestClient) -> None:
    tenant = new_tenant(db)
    create_device(db, tenant, "d1")
    viewer = key_for(db, tenant, role="viewer")
    read_only = key_for(db, tenant, role="operator", scopes=("read",))
    for h in (viewer, read_only):
        assert client.get("/api/devices/d1", headers=h).status_code == 200
        for resp in (
            client.post("/api/devices", json={"id": "d2"}, headers=h),
            client.patch("/api/devices/d1", json={"name": "x"}, headers=h),
            client.delete("/api/devices/d1", headers=h),
            client.post("/api/devices/d1/rotate-key", headers=h),
            client.post("/api/devices/d1/revoke-key", headers=h),
            client.post("/api/devices/import", content=b"id\nd3\n", headers={**h, "content-type": "text/csv"}),
        ):
            assert resp.status_code == 403, resp.text
            assert resp.headers["content-type"] == PROBLEM and "devices:write" in resp.json()["detail"]
    assert client.get("/api/devices", headers={"X-API-Key": "smk_nope_nope"}).status_code == 401
    assert db.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (tenant,)).fetchone() == (1,)
    assert audit_actions(db, tenant) == []


def test_csv_import(db: psycopg.Connection, client: TestClient) -> None:
    tenant = new_tenant(db)
    h = key_for(db, tenant)
    create_device(db, tenant, "old-1")
    csv = (
        b"id,name,device_type,metadata\n"
        b'press-1,Press 1,press,"{""site"": ""north""}"\n'
        b"press-2,,press,\n"
        b"bad id,x,press,\n"
        b"press-1,again,press,\n"
        b"old-1,,press,\n"
        b"press-3,,press,{not json}\n"
        b'press-4,,press,{"site": "a", "line": 2}\n'
        b"\n"
        b"press-5,,,\n"
    )
    resp = client.post("/api/devices/import", content=csv, headers={**h, "content-type": "text/csv"})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert (out["mode"], out["rows"], out["accepted"], out["rejected"]) == ("per_row", 8, 3, 5)
    by_line = {r["line"]: r for r in out["results"]}
    assert [r["id"] for r in out["results"] if r["status"] == "accepted"] == ["press-1", "press-2", "press-5"]
    assert "A-Z" in by_line[4]["reason"] and by_line[4]["device_key"] is None
    assert "also on line 2" in by_line[5]["reason"]
    assert "already exists" in by_line[6]["reason"]
    assert "metadata is not JSON" in by_line[7]["reason"]
    assert "quote fields" in by_line[8]["reason"]  # unquoted JSON with a comma splits into more fields
    assert by_line[10]["id"] == "press-5" and by_line[10]["status"] == "accepted"
    key = by_line[2]["device_key"]
    assert key.startswith("smd_") and ingest(client, key) == 200
    got = client.get("/api/devices/press-1", headers=h).json()
    assert got["metadata"] == {"site": "north"} and got["name"] == "Press 1" and got["device_type"] == "press"
    assert client.get("/api/devices/press-5", headers=h).json()["device_type"] is None
    actions = audit_actions(db, tenant)
    assert actions.count(("device.create", "press-1")) == 1 and actions[-1] == ("device.import", tenant)
    assert not any("smd_" in r[0] for r in db.execute("SELECT detail::text FROM audit_log").fetchall())

    # All or nothing: one bad row and nothing is registered.
    strict = client.post(
        "/api/devices/import?mode=all_or_nothing",
        content=b"id\nnew-1\nnew 2\n",
        headers={**h, "content-type": "text/csv"},
    )
    assert strict.status_code == 422 and strict.headers["content-type"] == PROBLEM
    assert [r["status"] for r in strict.json()["results"]] == ["valid", "rejected"]
    assert client.get("/api/devices/new-1", headers=h).status_code == 404

    # A multipart upload, as browsers and curl -F send it.
    upload = client.post(
        "/api/devices/import?mode=all_or_nothing",
        files={"file": ("devices.csv", b"id,device_type\nnew-1,pump\nnew-2,pump\n", "text/csv")},
        headers=h,
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["accepted"] == 2 and all(r["device_key"] for r in upload.json()["results"])

    def send(body: bytes, content_type: str = "text/csv") -> int:
        return client.post("/api/devices/import", content=body, headers={**h, "content-type": content_type}).status_code

    assert send(b"serial,name\nx,y\n") == 422  # unknown column
    assert send(b"") == 422
    assert send(b"\xff\xfe id\n") == 422
    assert send(b"id\n" + b"".join(f"m-{i}\n".encode() for i in range(1001))) == 413
    assert send(b"id\n" + b"x" * (2 << 20)) == 413
    assert send(b'{"id": "x"}', "application/json") == 415
    assert client.post("/api/devices/import", files={"file": ("a.csv", b"")}, headers=h).status_code == 422


def test_device_quota_covers_single_and_batch(db: psycopg.Connection, client: TestClient) -> None:
    tenant = new_tenant(db, plan="free")  # 10 devices
    child = new_tenant(db, parent=tenant)  # shares its parent's quota
    h = key_for(db, tenant)
    for i in range(7):
        create_device(db, tenant, f"d{i}")
    create_device(db, child, "c0")

    over = client.post("/api/devices/import", content=b"id\nn1\nn2\nn3\n", headers={**h, "content-type": "text/csv"})
    assert over.status_code == 429 and over.headers["content-type"] == PROBLEM
    assert int(over.headers["retry-after"]) > 0 and "quota" in over.json()["detail"]
    assert db.execute("SELECT count(*) FROM devices WHERE id LIKE 'n%%'").fetchone() == (0,)

    fits = client.post("/api/devices/import", content=b"id\nn1\nn2\n", headers={**h, "content-type": "text/csv"})
    assert fits.status_code == 200 and fits.json()["accepted"] == 2
    one_more = client.post(f"/api/devices?tenant_id={child}", json={"id": "c1"}, headers=h)
    assert one_more.status_code == 429 and "retry-after" in one_more.headers
    assert client.delete("/api/devices/d0", headers=h).status_code == 204
    assert client.post(f"/api/devices?tenant_id={child}", json={"id": "c1"}, headers=h).status_code == 201
