"""`sensormine lake ...` compacts, rolls up, shows history, vacuums and applies retention."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest
from typer.testing import CliRunner

from cli.main import app
from lake.rollups import ROLLUP_SCHEMA
from lake.storage import read_partition
from lake.telemetry import read_telemetry
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import existing_partition_days
from sensormine.settings import Settings, reset_settings
from sensormine.tenancy.tenants import create_tenant
from tests.factories import DAY, DAY_US, readings

pytestmark = pytest.mark.integration

D = DAY.date()


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", settings.database_migrate_url or "")
    monkeypatch.setenv("SENSORMINE_LAKE_URI", settings.lake_root)
    reset_settings()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, ["lake", *args])
    reset_settings()


def test_compact_history_vacuum_and_retention(cli, conn: psycopg.Connection, settings: Settings) -> None:
    create_tenant(conn, "acme")
    old = D - timedelta(days=9)
    rows = readings("acme", "d1", 120, step_us=30_000_000)
    old_rows = readings("acme", "d1", 10, start_us=DAY_US - 9 * 86_400_000_000)
    HotStoreWriter(conn).write(rows + old_rows)

    out = cli("compact", "acme", D.isoformat())
    assert out.exit_code == 0, out.output
    assert f"telemetry: {len(rows)} rows of acme {D}, table version 1" in out.output
    assert "telemetry_1m: 120 buckets over 240 readings" in out.output  # 60 minutes x 2 metrics
    assert "telemetry_1h: 2 buckets over 240 readings" in out.output
    assert read_telemetry(settings, ["acme"]).num_rows == len(rows)
    assert read_partition(settings, "telemetry_1m", ROLLUP_SCHEMA, "acme", D).num_rows == 120

    out = cli("compact", "acme", D.isoformat(), "--no-rollups")
    assert out.exit_code == 0 and "telemetry_1m" not in out.output
    hist = cli("history", "telemetry")
    assert hist.exit_code == 0, hist.output
    lines = hist.output.splitlines()
    assert lines[1].split()[:1] == ["2"] and f"acme/{D}" in lines[1] and "compact_day" in lines[1]
    assert cli("history", "nope").exit_code == 1

    refused = cli("vacuum", "telemetry", "--retention-hours", "0")
    assert refused.exit_code == 1 and "--force" in refused.output
    dry = cli("vacuum", "telemetry", "--retention-hours", "0", "--force", "--dry-run")
    assert dry.exit_code == 0 and "1 file(s) would be deleted" in dry.output

    # The old day (free plan: 7 hot days) is not in the lake yet: retention keeps it and says why.
    kept = cli("retention", "--today", D.isoformat())
    assert kept.exit_code == 0, kept.output
    assert f"hot {old} (20 rows): kept: acme: not compacted into the lake" in kept.output
    assert cli("compact", "acme", old.isoformat(), "--no-rollups").exit_code == 0
    conn.execute("UPDATE lake_compactions SET verified_rows = row_count, verified_at = now()")
    conn.commit()
    dropped = cli("retention", "--today", D.isoformat())
    assert f"hot {old} (20 rows): dropped: in the lake and verified (acme)" in dropped.output
    assert old not in existing_partition_days(conn)
    assert cli("compact", "acme", "not-a-day").exit_code != 0
