"""No superuser at run time: each process logs in as its own role, takes only the function roles it is a
member of, and a connection that forgot its scope reads nothing (docs/decisions.md)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from lake.telemetry import compact_day
from sensormine.clients.postgres import ALERTS, AUTH, INGEST, LAKE, METERING, READER, WRITER, connect
from sensormine.ingest.sinks import DirectSink
from sensormine.reading import Reading
from sensormine.services.postgres import role_url
from sensormine.settings import Settings, reset_settings
from serving.main import create_app
from tests.factories import DAY_US, make_tenant

pytestmark = pytest.mark.integration

TENANT_TABLES = ("tenants", "devices", "users", "api_keys", "telemetry", "audit_log", "dead_letters", "usage")


def as_login(settings: Settings, login: str) -> Settings:
    """`settings` with the process logging in as `login` (passwords from the launcher's PGPASSFILE)."""
    return settings.model_copy(update={"database_url": role_url(settings.database_url or "", login)})


def test_a_connection_without_a_scope_reads_and_writes_nothing(conn: psycopg.Connection, settings: Settings) -> None:
    """Regression: the API and daemons connected as the superuser, so one forgotten SET ROLE showed every tenant."""
    make_tenant(conn, "acme", ["d1"])
    conn.commit()
    for login in ("sensormine_app", "sensormine_api", "sensormine_ingestd", "sensormine_dagster"):
        with connect(as_login(settings, login), autocommit=True) as bare:
            for table in TENANT_TABLES:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                    bare.execute(f"SELECT count(*) FROM {table}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                bare.execute("UPDATE devices SET name = 'x'")


@pytest.mark.parametrize(
    ("login", "allowed"),
    [
        ("sensormine_api", {READER, WRITER, AUTH, INGEST, METERING, ALERTS}),
        ("sensormine_ingestd", {INGEST, ALERTS}),
        ("sensormine_dagster", {LAKE}),
        ("sensormine_streamd", {ALERTS}),
    ],
)
def test_each_process_login_takes_only_its_function_roles(settings: Settings, login: str, allowed: set[str]) -> None:
    for role in (READER, WRITER, AUTH, INGEST, METERING, LAKE, ALERTS):
        if role in allowed:
            with connect(as_login(settings, login), role=role) as c:
                assert c.execute("SELECT current_user").fetchone() == (role,)
        else:
            with pytest.raises(psycopg.OperationalError, match=f"not a member of {role}"):
                connect(as_login(settings, login), role=role)


def test_every_tenant_table_forces_row_level_security_on_its_owner(conn: psycopg.Connection) -> None:
    rows = conn.execute(
        "SELECT c.relname, c.relforcerowsecurity, pg_get_userbyid(c.relowner) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relrowsecurity AND NOT c.relispartition"
    ).fetchall()
    assert len(rows) >= 15
    assert [name for name, forced, _ in rows if not forced] == []
    assert {owner for _, _, owner in rows} == {"sensormine_owner"}


SESSION_FUNCTION = re.compile(r"(\(\s*SELECT\s+)?sensormine_(visible_tenants|is_platform)\(\)")


def test_policies_read_the_session_tenants_once_per_query(conn: psycopg.Connection, settings: Settings) -> None:
    """A session function called bare in a policy runs for every row a scan reads (migration 017)."""
    policies = conn.execute("SELECT tablename, policyname, qual, with_check FROM pg_policies").fetchall()
    calls = [
        (table, name, m.group(0))
        for table, name, *exprs in policies
        for expr in exprs
        if expr
        for m in SESSION_FUNCTION.finditer(expr)
    ]
    assert len(calls) >= 16
    assert [call for call in calls if not call[2].startswith("(")] == []
    # And the plan shows it: one InitPlan, not a call in the scan's filter.
    make_tenant(conn, "acme", ["d1"])
    with connect(settings, role=READER) as reader:
        reader.execute("SELECT set_config('sensormine.tenant_ids', 'acme', false)")
        plan = "\n".join(r[0] for r in reader.execute("EXPLAIN SELECT count(*) FROM telemetry WHERE value > 0"))
    assert "InitPlan" in plan and "sensormine_visible_tenants" not in plan.split("InitPlan")[0], plan


def test_function_roles_reach_only_their_tables(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1"])
    conn.commit()
    with connect(settings, role=INGEST, autocommit=True) as ingest:
        assert ingest.execute("SELECT count(*) FROM devices").fetchone() == (1,)  # validation needs the registry
        for table in ("telemetry", "users", "api_keys", "audit_log", "usage"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                ingest.execute(f"SELECT count(*) FROM {table}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            ingest.execute(
                "CREATE TABLE telemetry_p20990101 PARTITION OF telemetry FOR VALUES FROM "
                "('2099-01-01') TO ('2099-01-02')"
            )
    with connect(settings, role=LAKE, autocommit=True) as lake:
        for table in ("users", "api_keys", "audit_log", "dead_letters"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                lake.execute(f"SELECT count(*) FROM {table}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            lake.execute(
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value) VALUES ('acme', 'd1', 'm', now(), 1)"
            )
    with connect(settings, role=AUTH, autocommit=True) as auth:
        for table in ("telemetry", "audit_log", "usage", "dead_letters", "alarms", "alert_rules"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                auth.execute(f"SELECT count(*) FROM {table}")
    with connect(settings, role=ALERTS, autocommit=True) as alerts:
        assert alerts.execute("SELECT count(*) FROM devices").fetchone() == (1,)  # scopes read the registry
        for table in ("users", "api_keys", "audit_log", "usage", "dead_letters"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                alerts.execute(f"SELECT count(*) FROM {table}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # it replays readings, never writes them
            alerts.execute(
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value) VALUES ('acme', 'd1', 'm', now(), 1)"
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # rules are the API's to change
            alerts.execute("DELETE FROM alert_rules")


def test_the_platform_runs_end_to_end_as_its_process_logins(conn: psycopg.Connection, settings: Settings) -> None:
    """The API (HTTP ingest without Kafka, then a query), a daemon's sink, and a compaction, each as its login."""
    key = make_tenant(conn, "acme", [])
    conn.commit()
    api = as_login(settings.model_copy(update={"kafka_bootstrap": None}), "sensormine_api")
    day = datetime.fromtimestamp(DAY_US / 1e6, UTC).date()
    with TestClient(create_app(api)) as client:
        headers = {"X-API-Key": key}
        resp = client.post("/api/devices", json={"id": "press-1"}, headers=headers)
        assert resp.status_code == 201, resp.text
        device_key = resp.json()["device_key"]
        items = [{"ts": "2026-11-26T00:00:00Z", "values": {"temp": 20.5}}, {"ts": "x", "values": {"temp": 1}}]
        resp = client.post("/api/ingest", content=orjson.dumps(items), headers={"X-Device-Key": device_key})
        assert resp.status_code == 200 and resp.json()["accepted_items"] == 1, resp.text

        sink = DirectSink(lambda: connect(as_login(settings, "sensormine_ingestd"), role=INGEST), settings)
        sink.publish(
            "acme",
            "press-1",
            "mqtt",
            [Reading("acme", "press-1", "temp", DAY_US + 1_000_000, 21.0, 0, DAY_US + 2_000_000)],
        )
        sink.close()

        with connect(as_login(settings, "sensormine_dagster"), role=LAKE) as lake:
            assert compact_day(lake, settings, "acme", day).rows == 2
        resp = client.get(
            "/api/query/telemetry",
            params={
                "device_id": "press-1",
                "metric": "temp",
                "start": "2026-11-25T00:00:00Z",
                "end": "2026-11-28T00:00:00Z",
            },
            headers=headers,
        )
        assert resp.status_code == 200, resp.text
        assert [p["value"] for p in resp.json()["points"]] == [20.5, 21.0]
    stored = conn.execute("SELECT metric, value FROM telemetry ORDER BY ts").fetchall()
    assert stored == [("temp", 20.5), ("temp", 21.0)]
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM audit_log WHERE action = 'device.create'").fetchone() == (1,)


def test_db_bootstrap_and_migrate_through_the_cli(services: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A server someone else runs: a superuser bootstraps the roles, then the owner migrates (no superuser)."""
    import uuid
    from pathlib import Path

    from typer.testing import CliRunner

    from cli.main import app

    name = f"sm_test_{uuid.uuid4().hex[:10]}"
    admin = services["SENSORMINE_DATABASE_ADMIN_URL"].rsplit("/", 1)[0]
    with psycopg.connect(f"{admin}/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')  # owned by the superuser, as a DBA would make it
    try:
        runner = CliRunner()
        passwords = Path(services["PGPASSFILE"]).with_name("credentials.json")  # the launcher's own passwords
        done = runner.invoke(app, ["db", "bootstrap", "--admin-url", f"{admin}/{name}", "--passwords", str(passwords)])
        assert done.exit_code == 0, done.output
        assert "now run `sensormine db migrate`" in done.output
        owner = services["SENSORMINE_DATABASE_MIGRATE_URL"].rsplit("/", 1)[0]
        monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", f"{owner}/{name}")
        reset_settings()
        migrated = runner.invoke(app, ["db", "migrate"])
        assert migrated.exit_code == 0, migrated.output
        assert "016_least_privilege.sql" in migrated.output
        with psycopg.connect(f"{admin}/{name}") as c:
            assert c.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)
            ).fetchone() == ("sensormine_owner",)
        missing = runner.invoke(app, ["db", "bootstrap", "--admin-url", f"{admin}/{name}", "--passwords", "/dev/null"])
        assert missing.exit_code != 0
    finally:
        with psycopg.connect(f"{admin}/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
