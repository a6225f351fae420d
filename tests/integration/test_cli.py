"""The `sensormine` CLI creates tenants, sub-tenants, devices and keys through the registry."""

from __future__ import annotations

import re

import psycopg
import pytest
from typer.testing import CliRunner

from sensormine.cli import app
from sensormine.kafka import make_admin
from sensormine.registry import hash_secret, resolve_api_key, visible_tenant_ids
from sensormine.settings import Settings, reset_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_KAFKA_BOOTSTRAP", settings.kafka_bootstrap or "")
    monkeypatch.setenv("SENSORMINE_ENV", settings.env)
    reset_settings()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args))
    reset_settings()


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
    assert "parent tenant 'nobody' does not exist" in orphan.output
    assert cli("tenant", "create", "Bad_Id").exit_code == 1
    assert "does not exist" in cli("device", "create", "nobody", "d1").output
    assert cli("tenant", "create", "acme").exit_code == 0
    again = cli("tenant", "create", "acme")
    assert again.exit_code == 1 and "already exists" in again.output
