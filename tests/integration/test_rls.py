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


# Tables that hold no tenant's rows, and why (everything else with tenant data must have a policy).
NO_TENANT_ROWS = {
    "schema_migrations": "the applied migrations",
    "ingest_offsets": "the consumer's Kafka positions, per consumer group (service bookkeeping)",
    "usage_flushes": "ids of usage batches already added (the ledger's dedupe record; counts live in usage)",
    "anomaly_models": "models trained per device type across tenants (platform metadata, no API role may read it)",
    "stripe_catalog": "the plans' products and prices at Stripe (platform metadata, only the metering role reads it)",
}


def test_every_table_with_tenant_rows_has_row_level_security(conn: psycopg.Connection) -> None:
    """Regression: dead_letters, dlq_replays and lake_compactions had none (the DLQ filtered in application code)."""
    tables = conn.execute(
        "SELECT c.relname, c.relrowsecurity, "
        "EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' "
        "AND NOT a.attisdropped), "
        "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1"
    ).fetchall()
    unprotected = [name for name, rls, _, policies in tables if not (rls and policies) and name not in NO_TENANT_ROWS]
    assert unprotected == [], "tables with tenant data and no row-level security policy"
    assert all(has_tenant for name, _, has_tenant, _ in tables if name not in {*NO_TENANT_ROWS, "tenants"})
    # The exempt ones really hold no tenant column (a new one would need a policy, not an exemption).
    assert not any(has_tenant for name, _, has_tenant, _ in tables if name in NO_TENANT_ROWS)


def test_dead_letters_and_compactions_of_other_tenants_are_invisible(conn: psycopg.Connection, tree: None) -> None:
    for t in ("parent", "child", "sibling", None):
        conn.execute(
            "INSERT INTO dead_letters (source, tenant_id, device_id, reason, payload) "
            "VALUES ('http', %s, 'd', 'r', '')",
            (t,),
        )
    for t in ("parent", "child", "sibling"):
        conn.execute(
            "INSERT INTO lake_compactions (tenant_id, day, row_count, table_version) VALUES (%s, '2026-11-26', 1, 1)",
            (t,),
        )
    conn.commit()
    visible = visible_tenant_ids(conn, "child")
    with tenant_scope(conn, visible):
        assert _ids(conn, "SELECT tenant_id FROM dead_letters") == {"child"}
        assert _ids(conn, "SELECT tenant_id FROM lake_compactions") == {"child"}
    with tenant_scope(conn, [], platform=True):
        assert {r[0] for r in conn.execute("SELECT tenant_id FROM dead_letters")} == {
            "parent",
            "child",
            "sibling",
            None,
        }
