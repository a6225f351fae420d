"""Row-level security in the database itself: the second wall behind the API's checks."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from sensormine.audit.log import record
from sensormine.clients.postgres import tenant_scope
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.users import create_user
from sensormine.tenancy.tenants import visible_tenant_ids
from tests.factories import make_tenant

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Operator:
    subject: str = "cli"
    role: str = "platform_admin"


OPERATOR = Operator()


def _refused() -> pytest.RaisesContext:
    return pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security")


@pytest.fixture
def tree(conn: psycopg.Connection) -> None:
    make_tenant(conn, "parent", ["p1"])
    make_tenant(conn, "child", ["c1"], parent_id="parent")
    make_tenant(conn, "sibling", ["s1"], parent_id="parent")
    make_tenant(conn, "grandchild", ["g1"], parent_id="child")
    for t in ("parent", "child", "sibling", "grandchild"):
        create_user(conn, t, f"admin@{t}.example", "a-long-password", "tenant_admin")
        create_api_key(conn, t, "k")
        with conn.transaction():
            record(conn, OPERATOR, t, "tenant.create", "tenant", t)
    conn.commit()


def _ids(conn: psycopg.Connection, sql: str) -> set[str]:
    return {r[0] for r in conn.execute(sql).fetchall()}


@pytest.mark.parametrize("write", [False, True])
def test_a_session_sees_only_its_subtree(conn: psycopg.Connection, tree: None, write: bool) -> None:
    visible = visible_tenant_ids(conn, "child")
    assert set(visible) == {"child", "grandchild"}
    with tenant_scope(conn, visible, write=write):
        assert _ids(conn, "SELECT id FROM tenants") == {"child", "grandchild"}
        assert _ids(conn, "SELECT id FROM devices") == {"c1", "g1"}
        assert _ids(conn, "SELECT tenant_id FROM users") == {"child", "grandchild"}
        assert _ids(conn, "SELECT tenant_id FROM api_keys") == {"child", "grandchild"}
        assert _ids(conn, "SELECT tenant_id FROM audit_log") == {"child", "grandchild"}


def test_writes_outside_the_subtree_are_refused_or_touch_nothing(conn: psycopg.Connection, tree: None) -> None:
    visible = visible_tenant_ids(conn, "child")
    with _refused(), tenant_scope(conn, visible, write=True):
        conn.execute("INSERT INTO devices (tenant_id, id, name, key_hash) VALUES ('sibling', 'x', 'x', 'h')")
    with _refused(), tenant_scope(conn, visible, write=True):
        conn.execute("INSERT INTO tenants (id, name, parent_id) VALUES ('intruder', 'x', 'sibling')")
    with tenant_scope(conn, visible, write=True):
        assert conn.execute("UPDATE tenants SET name = 'taken' WHERE id IN ('parent', 'sibling')").rowcount == 0
        assert conn.execute("DELETE FROM devices WHERE tenant_id = 'sibling'").rowcount == 0
        assert conn.execute("UPDATE users SET role = 'viewer' WHERE tenant_id = 'parent'").rowcount == 0
        # Inside the subtree the same statements work.
        conn.execute("INSERT INTO tenants (id, name, parent_id) VALUES ('great-grandchild', 'x', 'grandchild')")
        assert conn.execute("UPDATE devices SET name = 'renamed' WHERE tenant_id = 'grandchild'").rowcount == 1
    # A top-level tenant needs a platform session.
    with _refused(), tenant_scope(conn, visible, write=True):
        conn.execute("INSERT INTO tenants (id, name, plan) VALUES ('rogue', 'x', 'pro')")
    with tenant_scope(conn, [], write=True, platform=True):
        conn.execute("INSERT INTO tenants (id, name, plan) VALUES ('newco', 'x', 'pro')")
        assert "parent" in _ids(conn, "SELECT id FROM tenants")


def test_api_sessions_cannot_write_telemetry_or_the_audit_trail_history(conn: psycopg.Connection, tree: None) -> None:
    visible = visible_tenant_ids(conn, "child")
    with pytest.raises(psycopg.errors.InsufficientPrivilege), tenant_scope(conn, visible, write=True):
        conn.execute("DELETE FROM audit_log")
    with pytest.raises(psycopg.errors.InsufficientPrivilege), tenant_scope(conn, visible, write=True):
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value) VALUES ('child','c1','m',now(),1)"
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege), tenant_scope(conn, visible, write=False):
        conn.execute("UPDATE devices SET name = 'x'")


def test_plans_cascade_to_sub_tenants_without_their_own(conn: psycopg.Connection, tree: None) -> None:
    conn.execute("UPDATE tenants SET plan = 'pro' WHERE id = 'parent'")
    conn.execute("UPDATE tenants SET plan = 'enterprise' WHERE id = 'sibling'")
    rows = dict(conn.execute("SELECT id, sensormine_effective_plan(id) FROM tenants").fetchall())
    quota = dict(conn.execute("SELECT id, sensormine_quota_tenant(id) FROM tenants").fetchall())
    assert rows == {"parent": "pro", "child": "pro", "grandchild": "pro", "sibling": "enterprise"}
    assert quota == {"parent": "parent", "child": "parent", "grandchild": "parent", "sibling": "sibling"}
