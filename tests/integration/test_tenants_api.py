"""Tenants through the API on the real database: creation, cascade of configuration, isolation, audit, paging."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.identity.api_keys import create_api_key
from sensormine.identity.users import create_user
from sensormine.settings import Settings
from sensormine.tenancy.config import effective_config
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


class Api:
    """A test client that logs users in and remembers their bearer headers."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def login(self, email: str, password: str = PASSWORD) -> dict[str, str]:
        resp = self.client.post("/api/auth/token", data={"username": email, "password": password})
        assert resp.status_code == 200, resp.text
        return {"Authorization": f"Bearer {resp.json()['access_token']}"}

    def user(self, admin: dict[str, str], email: str, role: str, tenant_id: str | None) -> dict[str, str]:
        body: dict[str, Any] = {"email": email, "password": PASSWORD, "role": role}
        if tenant_id:
            body["tenant_id"] = tenant_id
        resp = self.client.post("/api/users", json=body, headers=admin)
        assert resp.status_code == 201, resp.text
        return self.login(email)

    def walk(self, path: str, headers: dict[str, str], limit: int, **params: Any) -> list[dict[str, Any]]:
        """Every item of a paginated list, page by page."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
            page = self.client.get(path, params=query, headers=headers)
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["items"]) <= limit
            items.extend(body["items"])
            cursor = body["next_cursor"]
            if cursor is None:
                return items


@pytest.fixture
def api(settings: Settings, conn: psycopg.Connection) -> Iterator[Api]:
    create_user(conn, None, "root@platform.test", PASSWORD, "platform_admin")
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as client:
        yield Api(client)


def test_create_and_cascade_to_a_sub_tenant(api: Api) -> None:
    c = api.client
    root = api.login("root@platform.test")
    made = c.post(
        "/api/tenants",
        json={
            "id": "acme",
            "name": "ACME",
            "plan": "pro",
            "settings": {"timezone": "UTC", "retention.days": 30},
            "branding": {"primary_color": "#112233", "logo_url": "https://acme.test/logo.png"},
        },
        headers=root,
    )
    assert made.status_code == 201, made.text
    assert made.headers["location"] == "/api/tenants/acme"
    assert made.json()["effective"]["features"]["sub_tenants"] is True
    admin = api.user(root, "admin@acme.test", "tenant_admin", "acme")

    sub = c.post("/api/tenants", json={"id": "acme-plant1", "name": "Plant 1"}, headers=admin)
    assert sub.status_code == 201, sub.text
    assert sub.json()["parent_id"] == "acme" and sub.json()["plan"] is None
    got = c.get("/api/tenants/acme-plant1", headers=admin).json()
    eff = got["effective"]
    assert (eff["plan"], eff["plan_from"]) == ("pro", "acme")
    assert eff["settings"] == {"timezone": "UTC", "retention.days": 30}
    assert eff["branding"]["primary_color"] == "#112233"
    assert eff["sources"]["settings.timezone"] == "acme"
    assert eff["sources"]["features.sql_access"] == "plan:pro"

    # Overrides on the sub-tenant win, key by key.
    patched = c.patch(
        "/api/tenants/acme-plant1",
        json={
            "settings": {"timezone": "Europe/Berlin"},
            "branding": {"primary_color": "#ABCDEF", "domain": "Plant1.Acme.Test"},
            "features": {"sql_access": False},
        },
        headers=admin,
    )
    assert patched.status_code == 200, patched.text
    eff = patched.json()["effective"]
    assert eff["settings"] == {"timezone": "Europe/Berlin", "retention.days": 30}
    assert eff["branding"] == {
        "primary_color": "#ABCDEF",
        "logo_url": "https://acme.test/logo.png",
        "domain": "plant1.acme.test",
    }
    assert eff["features"]["sql_access"] is False and eff["features"]["ai_schema_generation"] is True
    assert eff["sources"]["settings.timezone"] == "acme-plant1"
    assert eff["sources"]["settings.retention.days"] == "acme"
    # null removes the override: the parent's value applies again.
    cleared = c.patch("/api/tenants/acme-plant1", json={"settings": {"timezone": None}}, headers=admin).json()
    assert cleared["settings"] == {} and cleared["effective"]["settings"]["timezone"] == "UTC"

    # Tenant admins: no features of their own tenant, no plans, nothing their own tenant lacks.
    own = c.patch("/api/tenants/acme", json={"features": {"sql_access": False}}, headers=admin)
    assert own.status_code == 403 and "own tenant" in own.json()["detail"]
    assert c.patch("/api/tenants/acme", json={"plan": "enterprise"}, headers=admin).status_code == 403
    lacking = c.patch("/api/tenants/acme-plant1", json={"features": {"anomaly_detection": True}}, headers=admin)
    assert lacking.status_code == 403 and "anomaly_detection" in lacking.json()["detail"]
    assert c.patch("/api/tenants/acme", json={"name": "ACME Corp"}, headers=admin).json()["name"] == "ACME Corp"

    # The platform changes plans; the sub-tenant follows, until it gets a plan of its own.
    assert c.patch("/api/tenants/acme", json={"plan": "enterprise"}, headers=root).status_code == 200
    eff = c.get("/api/tenants/acme-plant1", headers=admin).json()["effective"]
    assert eff["plan"] == "enterprise" and eff["features"]["anomaly_detection"] is True
    own_plan = c.patch("/api/tenants/acme-plant1", json={"plan": "free"}, headers=root).json()
    assert own_plan["plan"] == "free" and own_plan["effective"]["plan_from"] == "acme-plant1"
    assert own_plan["effective"]["features"]["sql_access"] is False  # its own override still stands
    inherit = c.patch("/api/tenants/acme-plant1", json={"plan": None}, headers=root).json()
    assert inherit["plan"] is None and inherit["effective"]["plan"] == "enterprise"
    assert c.patch("/api/tenants/acme", json={"plan": None}, headers=root).status_code == 422
    assert c.patch("/api/tenants/acme", json={"plan": "gold"}, headers=root).status_code == 422
    assert c.patch("/api/tenants/acme", json={"features": {"sub_tenants": False}}, headers=root).status_code == 200

    # Validation of branding, features and settings.
    for bad in (
        {"branding": {"primary_color": "red"}},
        {"branding": {"logo_url": "ftp://acme.test/logo.png"}},
        {"branding": {"domain": "not a domain"}},
        {"branding": {"font": "Comic Sans"}},
        {"features": {"teleportation": True}},
        {"settings": {"bad key!": 1}},
        {"color": "#000000"},
    ):
        resp = c.patch("/api/tenants/acme-plant1", json=bad, headers=admin)
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")


def test_branding_and_features_routes(api: Api) -> None:
    c = api.client
    root = api.login("root@platform.test")
    assert c.post("/api/tenants", json={"id": "acme", "plan": "pro"}, headers=root).status_code == 201
    assert c.post("/api/tenants", json={"id": "acme-1", "parent_id": "acme"}, headers=root).status_code == 201
    put = c.put("/api/tenants/acme/branding", json={"primary_color": "#010203", "display_name": "A"}, headers=root)
    assert put.status_code == 200, put.text
    assert put.json()["own"] == {"primary_color": "#010203", "display_name": "A"}
    # PUT replaces: display_name is gone.
    again = c.put("/api/tenants/acme/branding", json={"accent_color": "#ffffff"}, headers=root).json()
    assert again["own"] == {"accent_color": "#ffffff"}
    child = c.get("/api/tenants/acme-1/branding", headers=root).json()
    assert child["own"] == {} and child["effective"] == {"accent_color": "#ffffff"}
    assert child["sources"] == {"accent_color": "acme"}

    feats = c.put("/api/tenants/acme-1/features", json={"sql_access": False}, headers=root).json()
    assert feats["own"] == {"sql_access": False} and feats["sources"]["sql_access"] == "acme-1"
    assert feats["sources"]["sub_tenants"] == "plan:pro"
    assert c.put("/api/tenants/acme-1/features", json={"warp": True}, headers=root).status_code == 422
    assert c.get("/api/tenants/acme-1/features", headers=root).json()["effective"]["sql_access"] is False


def test_sub_tenants_need_the_feature(api: Api) -> None:
    c = api.client
    root = api.login("root@platform.test")
    assert c.post("/api/tenants", json={"id": "tiny"}, headers=root).json()["plan"] == "free"
    admin = api.user(root, "admin@tiny.test", "tenant_admin", "tiny")
    refused = c.post("/api/tenants", json={"id": "tiny-1"}, headers=admin)
    assert refused.status_code == 403 and "sub_tenants" in refused.json()["detail"]
    top = c.post("/api/tenants", json={"id": "other", "parent_id": None}, headers=admin)
    # An explicit null parent asks for a top-level tenant: refused, never silently made a sub-tenant.
    assert top.status_code == 403 and "only platform administrators" in top.json()["detail"]
    assert c.patch("/api/tenants/tiny", json={"features": {"sub_tenants": True}}, headers=root).status_code == 200
    made = c.post("/api/tenants", json={"id": "tiny-1"}, headers=admin)
    assert made.status_code == 201, made.text
    again_top = c.post("/api/tenants", json={"id": "other", "parent_id": None}, headers=admin)
    assert again_top.status_code == 403 and "only platform administrators" in again_top.json()["detail"]
    assert c.post("/api/tenants", json={"id": "tiny-1"}, headers=admin).status_code == 409
    with_plan = c.post("/api/tenants", json={"id": "tiny-2", "plan": "pro"}, headers=admin)
    assert with_plan.status_code == 403
    viewer = api.user(admin, "viewer@tiny.test", "viewer", "tiny")
    assert c.post("/api/tenants", json={"id": "tiny-3"}, headers=viewer).status_code == 403
    assert c.get("/api/tenants/tiny", headers=viewer).status_code == 200
    assert c.post("/api/tenants", json={"id": "Bad_Id"}, headers=root).status_code == 422


def test_a_sub_tenant_sees_neither_parent_nor_sibling(api: Api, conn: psycopg.Connection) -> None:
    c = api.client
    root = api.login("root@platform.test")
    c.post("/api/tenants", json={"id": "acme", "plan": "pro"}, headers=root)
    c.post("/api/tenants", json={"id": "globex", "plan": "pro"}, headers=root)
    parent = api.user(root, "admin@acme.test", "tenant_admin", "acme")
    for sub in ("acme-a", "acme-b"):
        assert c.post("/api/tenants", json={"id": sub}, headers=parent).status_code == 201
    a = api.user(parent, "admin@a.test", "tenant_admin", "acme-a")
    api.user(parent, "admin@b.test", "tenant_admin", "acme-b")
    parent_key = c.post("/api/keys", json={"name": "acme"}, headers=parent).json()
    b_key = c.post("/api/keys", json={"name": "b", "tenant_id": "acme-b"}, headers=parent).json()
    users = {u["email"]: u["id"] for u in c.get("/api/users", headers=parent).json()["items"]}
    assert set(users) == {"admin@acme.test", "admin@a.test", "admin@b.test"}

    hidden = ("acme", "acme-b", "globex")
    for tenant in hidden:
        assert c.get(f"/api/tenants/{tenant}", headers=a).status_code == 404
        assert c.patch(f"/api/tenants/{tenant}", json={"name": "x"}, headers=a).status_code == 404
        assert c.get(f"/api/tenants/{tenant}/children", headers=a).status_code == 404
        assert c.get(f"/api/tenants/{tenant}/branding", headers=a).status_code == 404
        assert c.get("/api/users", params={"tenant_id": tenant}, headers=a).status_code == 404
        assert c.get("/api/keys", params={"tenant_id": tenant}, headers=a).status_code == 404
        assert c.get("/api/audit", params={"tenant_id": tenant}, headers=a).status_code == 404
        assert c.post("/api/tenants", json={"id": f"{tenant}-x", "parent_id": tenant}, headers=a).status_code == 404
        new_user = {"email": f"x@{tenant}.test", "password": PASSWORD, "role": "viewer", "tenant_id": tenant}
        assert c.post("/api/users", json=new_user, headers=a).status_code == 404
    assert [t["id"] for t in c.get("/api/tenants", headers=a).json()["items"]] == ["acme-a"]
    for email in ("admin@acme.test", "admin@b.test"):
        assert c.get(f"/api/users/{users[email]}", headers=a).status_code == 404
        assert c.patch(f"/api/users/{users[email]}", json={"name": "x"}, headers=a).status_code == 404
        assert c.delete(f"/api/users/{users[email]}", headers=a).status_code == 404
    for key in (parent_key, b_key):
        assert c.get(f"/api/keys/{key['id']}", headers=a).status_code == 404
        assert c.delete(f"/api/keys/{key['id']}", headers=a).status_code == 404
    assert c.get("/api/keys", headers=a).json()["items"] == []
    assert {u["email"] for u in c.get("/api/users", headers=a).json()["items"]} == {"admin@a.test"}
    audit = c.get("/api/audit", headers=a).json()["items"]
    assert audit and {e["tenant_id"] for e in audit} == {"acme-a"}
    # The sub-tenant still inherits what applies from above (its effective plan).
    assert c.get("/api/tenants/acme-a", headers=a).json()["effective"]["plan"] == "pro"

    # The parent sees its sub-tenants, never the other top-level tenant.
    assert [t["id"] for t in api.walk("/api/tenants/acme/children", parent, 1)] == ["acme-a", "acme-b"]
    assert {t["id"] for t in c.get("/api/tenants", headers=parent).json()["items"]} == {"acme", "acme-a", "acme-b"}
    assert c.get("/api/tenants/globex", headers=parent).status_code == 404
    assert c.patch("/api/tenants/acme-b", json={"name": "B"}, headers=parent).status_code == 200

    # API keys are bound the same way.
    a_key = create_api_key(conn, "acme-a", "a", role="tenant_admin")
    assert c.get("/api/tenants/acme", headers={"X-API-Key": a_key}).status_code == 404
    assert c.get("/api/tenants/acme-a", headers={"X-API-Key": a_key}).status_code == 200


def test_every_change_is_audited(api: Api) -> None:
    c = api.client
    root = api.login("root@platform.test")
    root_id = c.get("/api/auth/me", headers=root).json()["subject"]
    c.post("/api/tenants", json={"id": "acme", "plan": "pro"}, headers=root)
    admin = api.user(root, "admin@acme.test", "tenant_admin", "acme")
    admin_id = c.get("/api/auth/me", headers=admin).json()["subject"]
    c.post("/api/tenants", json={"id": "acme-1", "settings": {"a": 1}}, headers=admin)
    c.patch("/api/tenants/acme-1", json={"branding": {"primary_color": "#000000"}, "name": "One"}, headers=admin)
    c.patch("/api/tenants/acme", json={"plan": "enterprise"}, headers=root)

    entries = c.get("/api/audit", headers=admin).json()["items"]
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    by_action = [(e["action"], e["target_id"], e["actor"]) for e in entries]
    assert by_action == [
        ("tenant.update", "acme", root_id),
        ("tenant.update", "acme-1", admin_id),
        ("tenant.create", "acme-1", admin_id),
        ("user.create", admin_id.split(":")[1], root_id),
        ("tenant.create", "acme", root_id),
    ]
    update = entries[1]
    assert update["detail"] == {"name": "One", "branding": {"primary_color": "#000000"}}
    assert update["actor_role"] == "tenant_admin" and update["target_type"] == "tenant"
    assert entries[0]["detail"] == {"plan": "enterprise"}
    assert entries[2]["detail"]["settings"] == {"a": 1} and entries[2]["tenant_id"] == "acme"
    assert "password" not in str(entries[3]["detail"]).lower()

    only_tenant = c.get("/api/audit", params={"action": "tenant"}, headers=admin).json()["items"]
    assert {e["action"] for e in only_tenant} == {"tenant.create", "tenant.update"}
    exact = c.get("/api/audit", params={"action": "tenant.create"}, headers=admin).json()["items"]
    assert len(exact) == 2
    mine = c.get("/api/audit", params={"actor": admin_id}, headers=admin).json()["items"]
    assert {e["actor"] for e in mine} == {admin_id} and len(mine) == 2
    assert c.get("/api/audit", params={"action": "tenan"}, headers=admin).json()["items"] == []
    later = c.get("/api/audit", params={"since": "2999-01-01T00:00:00Z"}, headers=admin).json()["items"]
    assert later == []
    sub = c.get("/api/audit", params={"tenant_id": "acme-1"}, headers=admin).json()["items"]
    assert {e["tenant_id"] for e in sub} == {"acme-1"}
    # Paging back in time visits every entry once.
    walked = api.walk("/api/audit", admin, 2)
    assert [e["id"] for e in walked] == [e["id"] for e in entries]
    assert c.get("/api/audit", params={"cursor": "bm90LWFuLWlk"}, headers=admin).status_code == 422
    viewer = api.user(admin, "v@acme.test", "viewer", "acme")
    assert c.get("/api/audit", headers=viewer).status_code == 403


def test_pagination_walks_all_tenants(api: Api) -> None:
    c = api.client
    root = api.login("root@platform.test")
    ids = [f"t{i:02d}" for i in range(7)]
    for tid in ids:
        assert c.post("/api/tenants", json={"id": tid, "plan": "pro"}, headers=root).status_code == 201
    for i in range(5):
        assert c.post("/api/tenants", json={"id": f"t00-{i}", "parent_id": "t00"}, headers=root).status_code == 201
    everything = api.walk("/api/tenants", root, 3)
    assert [t["id"] for t in everything] == sorted(ids + [f"t00-{i}" for i in range(5)])
    assert [t["id"] for t in api.walk("/api/tenants/t00/children", root, 2)] == [f"t00-{i}" for i in range(5)]
    assert len(api.walk("/api/audit", root, 4, tenant_id="t00")) == 6
    assert c.get("/api/tenants", params={"limit": 0}, headers=root).status_code == 422


def test_effective_config_cascades_root_to_leaf(conn: psycopg.Connection) -> None:
    create_tenant(conn, "r", plan="pro")
    create_tenant(conn, "r-m", parent_id="r")
    create_tenant(conn, "r-m-l", parent_id="r-m")
    with conn.transaction():
        conn.execute(
            """UPDATE tenants SET settings = '{"a": 1, "b": 1}', features = '{"sql_access": false}' """
            "WHERE id = 'r'"
        )
        conn.execute("""UPDATE tenants SET settings = '{"b": 2}', branding = '{"x": "m"}' WHERE id = 'r-m'""")
        conn.execute("""UPDATE tenants SET plan = 'enterprise', features = '{"sql_access": true}' WHERE id = 'r-m-l'""")
    leaf = effective_config(conn, "r-m-l")
    assert leaf is not None
    assert (leaf.plan, leaf.plan_from) == ("enterprise", "r-m-l")
    assert leaf.settings == {"a": 1, "b": 2} and leaf.branding == {"x": "m"}
    assert leaf.features["sql_access"] is True and leaf.features["anomaly_detection"] is True
    assert leaf.sources["settings.a"] == "r" and leaf.sources["settings.b"] == "r-m"
    assert leaf.sources["features.sql_access"] == "r-m-l"
    middle = effective_config(conn, "r-m")
    assert middle is not None and middle.plan_from == "r" and middle.features["sql_access"] is False
    assert effective_config(conn, "nope") is None
