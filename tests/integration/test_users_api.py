"""Users, logins and API keys through the API on the real database, and the `user` CLI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.users import app as user_cli
from sensormine.identity.users import authenticate_password, create_user
from sensormine.settings import Settings, reset_settings
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


@pytest.fixture
def client(settings: Settings, conn: psycopg.Connection) -> Iterator[TestClient]:
    create_user(conn, None, "root@platform.test", PASSWORD, "platform_admin")
    create_tenant(conn, "acme", plan="pro")
    create_tenant(conn, "acme-1", parent_id="acme")
    create_tenant(conn, "globex", plan="pro")
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as c:
        yield c


def tokens(c: TestClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    resp = c.post("/api/auth/token", data={"username": email, "password": password})
    assert resp.status_code == 200, resp.text
    return resp.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(c: TestClient, email: str, password: str = PASSWORD) -> dict[str, str]:
    return bearer(tokens(c, email, password)["access_token"])


def new_user(c: TestClient, admin: dict[str, str], email: str, role: str, tenant: str | None = None) -> str:
    body = {"email": email, "password": PASSWORD, "role": role, **({"tenant_id": tenant} if tenant else {})}
    resp = c.post("/api/users", json=body, headers=admin)
    assert resp.status_code == 201, resp.text
    assert "password" not in resp.text
    return str(resp.json()["id"])


def test_login_refresh_and_logout(client: TestClient) -> None:
    c = client
    root = login(c, "root@platform.test")
    uid = new_user(c, root, "ops@acme.test", "operator", "acme")
    pair = tokens(c, "OPS@acme.test")
    assert pair["token_type"] == "bearer" and pair["expires_in"] > 0
    me = c.get("/api/auth/me", headers=bearer(pair["access_token"])).json()
    assert (me["subject"], me["tenant_id"], me["role"]) == (f"user:{uid}", "acme", "operator")
    assert c.get(f"/api/users/{uid}", headers=bearer(pair["access_token"])).json()["email"] == "ops@acme.test"
    bad = c.post("/api/auth/token", data={"username": "ops@acme.test", "password": "wrong password!"})
    assert bad.status_code == 401 and bad.headers["content-type"].startswith("application/problem+json")

    fresh = c.post("/api/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert fresh.status_code == 200, fresh.text
    assert c.get("/api/auth/me", headers=bearer(fresh.json()["access_token"])).status_code == 200
    wrong_type = c.post("/api/auth/refresh", json={"refresh_token": pair["access_token"]})
    assert wrong_type.status_code == 401

    assert c.post("/api/auth/logout", headers=bearer(pair["access_token"])).status_code == 204
    for token in (pair["access_token"], fresh.json()["access_token"]):
        assert c.get("/api/auth/me", headers=bearer(token)).status_code == 401
    for refresh in (pair["refresh_token"], fresh.json()["refresh_token"]):
        assert c.post("/api/auth/refresh", json={"refresh_token": refresh}).status_code == 401
    assert c.get("/api/auth/me", headers=login(c, "ops@acme.test")).status_code == 200
    assert c.get("/api/auth/me").status_code == 401


def test_disabled_user_is_rejected_at_once(client: TestClient) -> None:
    c = client
    root = login(c, "root@platform.test")
    new_user(c, root, "admin@acme.test", "tenant_admin", "acme")
    admin = login(c, "admin@acme.test")
    uid = new_user(c, admin, "viewer@acme-1.test", "viewer", "acme-1")
    viewer = tokens(c, "viewer@acme-1.test")
    assert c.get("/api/tenants/acme-1", headers=bearer(viewer["access_token"])).status_code == 200
    assert c.delete(f"/api/users/{uid}", headers=admin).status_code == 204
    assert c.get("/api/tenants/acme-1", headers=bearer(viewer["access_token"])).status_code == 401
    assert c.post("/api/auth/refresh", json={"refresh_token": viewer["refresh_token"]}).status_code == 401
    refused = c.post("/api/auth/token", data={"username": "viewer@acme-1.test", "password": PASSWORD})
    assert refused.status_code == 401
    assert c.get(f"/api/users/{uid}", headers=admin).json()["disabled"] is True
    assert c.delete(f"/api/users/{uid}", headers=admin).status_code == 204  # idempotent
    enabled = c.patch(f"/api/users/{uid}", json={"disabled": False}, headers=admin)
    assert enabled.status_code == 200 and enabled.json()["disabled"] is False
    assert c.get("/api/tenants/acme-1", headers=login(c, "viewer@acme-1.test")).status_code == 200
    me = c.get("/api/auth/me", headers=admin).json()["subject"].split(":")[1]
    assert c.delete(f"/api/users/{me}", headers=admin).status_code == 422


def test_role_escalation_is_refused(client: TestClient, conn: psycopg.Connection) -> None:
    c = client
    root = login(c, "root@platform.test")
    admin_id = new_user(c, root, "admin@acme.test", "tenant_admin", "acme")
    admin = login(c, "admin@acme.test")
    op_id = new_user(c, admin, "op@acme.test", "operator", "acme")
    op = login(c, "op@acme.test")
    sub_admin_id = new_user(c, admin, "admin@acme-1.test", "tenant_admin", "acme-1")
    sub_admin = login(c, "admin@acme-1.test")

    body = {"email": "x@acme.test", "password": PASSWORD, "role": "viewer"}
    assert c.post("/api/users", json=body, headers=op).status_code == 403  # lacks users:write
    platform = c.post("/api/users", json={**body, "role": "platform_admin"}, headers=admin)
    assert platform.status_code == 403 and "platform_admin" in platform.json()["detail"]
    assert c.patch(f"/api/users/{op_id}", json={"role": "platform_admin"}, headers=admin).status_code == 403
    assert c.patch(f"/api/users/{op_id}", json={"role": "tenant_admin"}, headers=op).status_code == 403
    own = c.patch(f"/api/users/{op_id}", json={"role": "viewer"}, headers=op)
    assert own.status_code == 403 and "own role" in own.json()["detail"]
    assert c.patch(f"/api/users/{admin_id}", json={"role": "operator"}, headers=op).status_code == 403
    # The sub-tenant's admin cannot reach the parent's users at all.
    assert c.patch(f"/api/users/{admin_id}", json={"role": "viewer"}, headers=sub_admin).status_code == 404
    assert c.post("/api/users", json={**body, "tenant_id": "globex"}, headers=admin).status_code == 404
    # Platform administrators make other platform administrators (and only without a tenant).
    assert (
        c.post("/api/users", json={**body, "role": "platform_admin", "tenant_id": "acme"}, headers=root).status_code
        == 422
    )
    root2 = new_user(c, root, "root2@platform.test", "platform_admin")
    assert c.get(f"/api/users/{root2}", headers=root).json()["tenant_id"] is None
    assert c.get(f"/api/users/{root2}", headers=admin).status_code == 404
    assert c.post("/api/users", json=body, headers=root).status_code == 422  # names no tenant
    duplicate = c.post("/api/users", json={**body, "email": "OP@acme.test"}, headers=admin)
    assert duplicate.status_code == 409
    short = c.post("/api/users", json={**body, "password": "short"}, headers=admin)
    assert short.status_code == 422 and "short" not in short.text

    # Self-service: name and password with any role; a new password ends the old sessions.
    renamed = c.patch(f"/api/users/{op_id}", json={"name": "Olga"}, headers=op)
    assert renamed.status_code == 200 and renamed.json()["name"] == "Olga"
    new_password = "a much better passphrase"
    assert c.patch(f"/api/users/{op_id}", json={"password": new_password}, headers=op).status_code == 200
    assert c.get("/api/auth/me", headers=op).status_code == 401
    op = login(c, "op@acme.test", new_password)
    assert c.get(f"/api/users/{admin_id}", headers=op).status_code == 403  # others need users:read

    # A demoted admin loses the permission at once.
    assert c.patch(f"/api/users/{sub_admin_id}", json={"role": "viewer"}, headers=admin).json()["role"] == "viewer"
    assert c.get("/api/users", headers=sub_admin).status_code == 401
    assert c.get("/api/users", headers=login(c, "admin@acme-1.test")).status_code == 403
    assert authenticate_password(conn, "op@acme.test", new_password).name == "Olga"

    audit = c.get("/api/audit", params={"action": "user"}, headers=admin).json()["items"]
    actions = [(e["action"], e["target_id"]) for e in audit]
    assert ("user.update", sub_admin_id) in actions and ("user.create", op_id) in actions
    demotion = next(e for e in audit if e["target_id"] == sub_admin_id and e["action"] == "user.update")
    assert demotion["detail"] == {"role": {"from": "tenant_admin", "to": "viewer"}}
    changed = next(e for e in audit if e["target_id"] == op_id and "password_changed" in e["detail"])
    assert changed["actor"] == f"user:{op_id}"
    assert PASSWORD not in str(audit) and new_password not in str(audit)


def test_api_keys_shown_once_narrow_and_revoked_at_once(client: TestClient) -> None:
    c = client
    root = login(c, "root@platform.test")
    new_user(c, root, "admin@acme.test", "tenant_admin", "acme")
    admin = login(c, "admin@acme.test")

    made = c.post("/api/keys", json={"name": "grafana", "role": "viewer", "scopes": ["read"]}, headers=admin)
    assert made.status_code == 201, made.text
    key = made.json()
    assert key["key"].startswith(f"smk_{key['id']}_") and key["tenant_id"] == "acme"
    assert "users:read" not in key["permissions"] and "tenants:read" in key["permissions"]
    listed = c.get("/api/keys", headers=admin).json()["items"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert key["key"] not in str(listed) and "key_hash" not in str(listed) and "key" not in listed[0]
    assert "key" not in c.get(f"/api/keys/{key['id']}", headers=admin).json()

    reader = {"X-API-Key": key["key"]}
    assert c.get("/api/tenants/acme", headers=reader).status_code == 200
    assert c.patch("/api/tenants/acme", json={"name": "x"}, headers=reader).status_code == 403
    assert c.get("/api/keys", headers=reader).status_code == 403

    # Never more than the creator holds: a read-only admin key cannot mint a writing key.
    ro_admin = c.post("/api/keys", json={"role": "tenant_admin", "scopes": ["read", "keys:write"]}, headers=admin)
    ro = {"X-API-Key": ro_admin.json()["key"]}
    excess = c.post("/api/keys", json={"role": "operator", "scopes": ["read", "write"]}, headers=ro)
    assert excess.status_code == 403 and "devices:write" in excess.json()["detail"]
    narrower = c.post("/api/keys", json={"role": "operator", "scopes": ["devices:read"]}, headers=ro)
    assert narrower.status_code == 201 and narrower.json()["permissions"] == ["devices:read"]
    assert (
        c.post("/api/keys", json={"role": "tenant_admin"}, headers={"X-API-Key": narrower.json()["key"]}).status_code
        == 403
    )
    assert c.post("/api/keys", json={"role": "platform_admin"}, headers=root).status_code == 422
    assert c.post("/api/keys", json={"scopes": ["fly"]}, headers=admin).status_code == 422
    assert c.post("/api/keys", json={"role": "device", "scopes": ["read"]}, headers=admin).status_code == 422
    new_user(c, admin, "op@acme.test", "operator", "acme")
    assert c.post("/api/keys", json={}, headers=login(c, "op@acme.test")).status_code == 403  # lacks keys:write
    sub_key = c.post("/api/keys", json={"name": "sub", "tenant_id": "acme-1"}, headers=admin).json()
    assert sub_key["tenant_id"] == "acme-1" and sub_key["role"] == "operator"
    assert c.post("/api/keys", json={"tenant_id": "globex"}, headers=admin).status_code == 404

    # Revoked: refused from the next request on.
    assert c.delete(f"/api/keys/{key['id']}", headers=admin).status_code == 204
    assert c.get("/api/tenants/acme", headers=reader).status_code == 401
    assert c.delete(f"/api/keys/{key['id']}", headers=admin).status_code == 204
    assert key["id"] not in {k["id"] for k in c.get("/api/keys", headers=admin).json()["items"]}
    revoked = c.get("/api/keys", params={"include_revoked": True}, headers=admin).json()["items"]
    assert next(k for k in revoked if k["id"] == key["id"])["revoked_at"] is not None
    assert c.delete("/api/keys/nope", headers=admin).status_code == 404

    audit = c.get("/api/audit", params={"action": "key"}, headers=admin).json()["items"]
    assert [e["action"] for e in audit].count("key.revoke") == 1
    create = next(e for e in audit if e["target_id"] == key["id"] and e["action"] == "key.create")
    assert create["detail"] == {"name": "grafana", "role": "viewer", "scopes": ["read"]}
    assert all(k["key"] not in str(audit) for k in (key, narrower.json(), sub_key))
    assert {e["tenant_id"] for e in audit} == {"acme", "acme-1"}


def test_users_and_keys_paginate(client: TestClient) -> None:
    c = client
    root = login(c, "root@platform.test")
    ids = {new_user(c, root, f"u{i}@acme.test", "viewer", "acme") for i in range(5)}
    ids.add(new_user(c, root, "u@acme-1.test", "viewer", "acme-1"))
    new_user(c, root, "u@globex.test", "viewer", "globex")
    new_user(c, root, "admin@acme.test", "tenant_admin", "acme")
    admin = login(c, "admin@acme.test")
    seen: list[str] = []
    cursor = None
    while True:
        page = c.get("/api/users", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=admin).json()
        seen.extend(u["id"] for u in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 7 and ids < set(seen) and seen == sorted(seen)
    only_sub = c.get("/api/users", params={"tenant_id": "acme-1"}, headers=admin).json()["items"]
    assert [u["email"] for u in only_sub] == ["u@acme-1.test"]
    keys = {c.post("/api/keys", json={"name": f"k{i}"}, headers=admin).json()["id"] for i in range(5)}
    walked: list[str] = []
    cursor = None
    while True:
        page = c.get("/api/keys", params={"limit": 3, **({"cursor": cursor} if cursor else {})}, headers=admin).json()
        walked.extend(k["id"] for k in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert walked == sorted(keys)


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", settings.database_migrate_url or "")
    monkeypatch.delenv("SENSORMINE_USER_PASSWORD", raising=False)
    reset_settings()
    runner = CliRunner()
    yield lambda *args, **kw: runner.invoke(user_cli, list(args), **kw)
    reset_settings()


def test_cli_makes_the_first_platform_admin(cli: Any, conn: psycopg.Connection) -> None:
    made = cli("create", "--email", "root@example.com", "--role", "platform_admin", "--password", PASSWORD)
    assert made.exit_code == 0, made.output
    assert PASSWORD not in made.output
    assert authenticate_password(conn, "root@example.com", PASSWORD).role == "platform_admin"
    create_tenant(conn, "acme")
    conn.commit()
    prompted = cli(
        "create", "--email", "op@acme.test", "--role", "operator", "--tenant", "acme", input=f"{PASSWORD}\n{PASSWORD}\n"
    )
    assert prompted.exit_code == 0, prompted.output
    from_env = cli(
        "create", "--email", "v@acme.test", "--tenant", "acme", env={"SENSORMINE_USER_PASSWORD": PASSWORD + "!"}
    )
    assert from_env.exit_code == 0 and authenticate_password(conn, "v@acme.test", PASSWORD + "!").role == "viewer"
    assert cli("create", "--email", "x@acme.test", "--role", "operator", "--password", PASSWORD).exit_code == 1
    tenant_root = cli(
        "create", "--email", "y@x.test", "--role", "platform_admin", "--tenant", "acme", "--password", PASSWORD
    )
    assert tenant_root.exit_code == 1
    duplicate = cli("create", "--email", "ROOT@example.com", "--role", "platform_admin", "--password", PASSWORD)
    assert duplicate.exit_code == 1 and "already exists" in duplicate.output
    assert cli("create", "--email", "z@acme.test", "--tenant", "acme", "--password", "short").exit_code == 1
    listed = cli("list").output
    assert "root@example.com\tplatform_admin\t-" in listed and "op@acme.test\toperator\tacme" in listed
    assert "acme" not in cli("list", "--platform").output
    assert cli("disable", "op@acme.test").exit_code == 0
    assert "op@acme.test\toperator\tacme\tdisabled" in cli("list", "--tenant", "acme").output
    assert cli("disable", "op@acme.test", "--enable").exit_code == 0
    assert cli("password", "op@acme.test", "--password", "another long one").exit_code == 0
    assert authenticate_password(conn, "op@acme.test", "another long one").email == "op@acme.test"
    assert cli("disable", "ghost@acme.test").exit_code == 1
    actions = [r[0] for r in conn.execute("SELECT action FROM audit_log WHERE actor = 'cli' ORDER BY id")]
    assert actions == ["user.create", "user.create", "user.create", "user.disable", "user.update", "user.update"]
