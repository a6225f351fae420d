"""The `sensormine` CLI creates tenants, sub-tenants, devices and keys through the registry."""

from __future__ import annotations

import re

import psycopg
import pytest

from sensormine.clients.kafka import make_admin
from sensormine.identity.api_keys import resolve_api_key
from sensormine.identity.secrets import hash_secret
from sensormine.settings import Settings
from sensormine.tenancy.tenants import visible_tenant_ids

pytestmark = pytest.mark.integration


def secret(output: str, label: str) -> str:
    match = re.search(rf"{label} \(shown once\): (\S+)", output)
    assert match, output
    return match[1]


def test_tenant_subtenant_and_device_creation(cli, settings: Settings, conn: psycopg.Connection) -> None:
    made = cli("tenant", "create", "acme", "--plan", "pro")
    assert made.exit_code == 0, made.output
    key = secret(made.output, "api key")
    assert resolve_api_key(conn, key) == ("acme", ["read", "write"])

    sub = cli("tenant", "create", "acme-east", "--parent", "acme")
    assert sub.exit_code == 0 and "under acme" in sub.output
    assert sorted(visible_tenant_ids(conn, "acme")) == ["acme", "acme-east"]
    assert visible_tenant_ids(conn, "acme-east") == ["acme-east"]

    device = cli("device", "create", "acme", "press-1", "--type", "press")
    assert device.exit_code == 0, device.output
    device_key = secret(device.output, "device key")
    stored = conn.execute("SELECT key_hash, device_type FROM devices WHERE id = 'press-1'").fetchone()
    assert stored == (hash_secret(device_key), "press")  # stored hashed, never in clear

    listing = cli("tenant", "list")
    assert [line.split("\t")[0] for line in listing.output.splitlines()] == ["acme", "acme-east"]
    topics = make_admin(settings).list_topics(timeout=10).topics
    assert settings.telemetry_topic("acme") in topics and settings.dlq_topic in topics


def test_errors_are_clear_and_exit_non_zero(cli) -> None:
    orphan = cli("tenant", "create", "orphan", "--parent", "nobody")
    assert orphan.exit_code == 1
    assert "tenant 'nobody' not found" in orphan.output
    assert cli("tenant", "create", "Bad_Id").exit_code == 1
    assert "does not exist" in cli("device", "create", "nobody", "d1").output
    assert cli("tenant", "create", "acme").exit_code == 0
    again = cli("tenant", "create", "acme")
    assert again.exit_code == 1 and "already exists" in again.output


def _audit(conn: psycopg.Connection, action: str, target_id: str) -> tuple[str, str, dict]:
    """(actor, tenant, detail) of the one audit entry of an action on a target."""
    rows = conn.execute(
        "SELECT actor, tenant_id, detail FROM audit_log WHERE action = %s AND target_id = %s", (action, target_id)
    ).fetchall()
    conn.commit()
    assert len(rows) == 1, (action, target_id, rows)
    return rows[0]


def test_the_cli_writes_the_same_audit_entries_and_applies_the_same_checks_as_the_api(
    cli, settings: Settings, conn: psycopg.Connection
) -> None:
    """Regression: `tenant create`, `device create` and `apikey create` wrote no audit entry, and devices were
    created past the plan's quota; the CLI now calls the API's use cases, as the operator `cli`."""
    from fastapi.testclient import TestClient

    from sensormine.identity.users import create_user
    from serving.main import create_app

    create_user(conn, None, "root@platform.test", "correct horse battery", "platform_admin")
    assert cli("tenant", "create", "acme", "--plan", "free").exit_code == 0
    with TestClient(create_app(settings.model_copy(update={"limits_enabled": False}))) as client:
        token = client.post(
            "/api/auth/token", data={"username": "root@platform.test", "password": "correct horse battery"}
        ).json()["access_token"]
        root = {"Authorization": f"Bearer {token}"}
        assert client.post("/api/tenants", json={"id": "globex", "plan": "free"}, headers=root).status_code == 201
        api_device = client.post(
            "/api/devices?tenant_id=globex", json={"id": "d1", "device_type": "press"}, headers=root
        )
        assert api_device.status_code == 201, api_device.text
        api_key = client.post("/api/keys", json={"tenant_id": "globex", "name": "k"}, headers=root)
        assert api_key.status_code == 201, api_key.text
        api_key_id = api_key.json()["id"]

    assert cli("device", "create", "acme", "d1", "--type", "press").exit_code == 0
    made = cli("apikey", "create", "acme", "--name", "k")
    assert made.exit_code == 0, made.output
    cli_key_id = secret(made.output, "api key").split("_")[1]

    # Same actions, same details; only the actor (and the tenant) differ.
    api_tenant, cli_tenant = _audit(conn, "tenant.create", "globex"), _audit(conn, "tenant.create", "acme")
    assert cli_tenant[0] == "cli" and api_tenant[0].startswith("user:")
    assert {k: v for k, v in cli_tenant[2].items() if k != "name"} == {
        k: v for k, v in api_tenant[2].items() if k != "name"
    }
    rows = conn.execute(
        "SELECT actor, tenant_id, detail FROM audit_log WHERE action = 'device.create' ORDER BY tenant_id"
    ).fetchall()
    assert [(r[1], r[2]) for r in rows] == [
        ("acme", {"name": "d1", "device_type": "press", "metadata": {}}),
        ("globex", {"name": "d1", "device_type": "press", "metadata": {}}),
    ]
    assert _audit(conn, "key.create", cli_key_id)[2] == {"name": "k", "role": "operator", "scopes": ["read", "write"]}
    assert _audit(conn, "key.create", api_key_id)[2] == {"name": "k", "role": "operator", "scopes": ["read", "write"]}
    # The same Kafka topics for both tenants.
    topics = make_admin(settings).list_topics(timeout=10).topics
    assert {settings.telemetry_topic("acme"), settings.telemetry_topic("globex"), settings.dlq_topic} <= set(topics)

    # The free plan's device quota (10) holds at the command line too; beyond it only explicitly, and audited.
    for i in range(2, 11):
        assert cli("device", "create", "acme", f"d{i}").exit_code == 0
    refused = cli("device", "create", "acme", "d11")
    assert refused.exit_code == 1 and "device quota reached" in refused.output and "--beyond-quota" in refused.output
    assert conn.execute("SELECT count(*) FROM devices WHERE id = 'd11'").fetchone() == (0,)
    forced = cli("device", "create", "acme", "d11", "--beyond-quota")
    assert forced.exit_code == 0, forced.output
    assert _audit(conn, "device.create", "d11")[2] == {
        "name": "d11",
        "device_type": None,
        "metadata": {},
        "beyond_quota": True,
    }
