"""Dagster as users run it: `dagster dev` (webserver + daemon) over the test's database and lake.

Tenants created in the registry become partitions through the daemon's sensor ticks, the
compaction schedule launches runs that land the day in the lake, and a backfill launched through
the webserver's GraphQL (the UI's own mutation) completes. Before the fix of the sensors'
resource parameter, every sensor tick failed under the daemon and none of this happened.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from lake.telemetry import read_telemetry
from orchestration.webserver import (
    TELEMETRY_ASSET_PATHS,
    TERMINAL_BACKFILL_STATES,
    DagsterWebserver,
    dagster_dev,
    prepare_dagster_home,
)
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import ensure_partition_window
from sensormine.reading import Reading, datetime_to_us
from sensormine.settings import Settings
from tests.conftest import REPO
from tests.e2e.test_demo import free_port
from tests.factories import make_tenant, wait_until

pytestmark = pytest.mark.e2e

T = TypeVar("T")
SENSORS = ("tenant_partitions_sensor", "hot_data_sensor", "failed_quality_checks_sensor")


def day_readings(tenant_id: str, day: date, n: int) -> list[Reading]:
    """n readings of one device, a second apart from the day's midnight."""
    start = datetime_to_us(datetime(day.year, day.month, day.day, tzinfo=UTC))
    return [Reading(tenant_id, "d1", "temp", start + i * 1_000_000, float(i), 0, start) for i in range(n)]


def eventually(probe: Callable[[], T | None], timeout: float, what: str, log: Path) -> T:
    """The first truthy answer of `probe`, polled every second for up to `timeout` seconds."""
    answer = wait_until(probe, timeout, interval=1.0)
    if not answer:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; dagster dev log ends:\n{tail}")
    return answer


@pytest.fixture
def dagster_env(settings: Settings, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a `dagster dev` serving orchestration.definitions for the test's database and lake,
    and the log it is to write."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORMINE_")}
    env.update(
        {
            "DAGSTER_HOME": str(prepare_dagster_home(tmp_path / "dagster")),
            "SENSORMINE_DATABASE_URL": settings.database_url or "",
            "SENSORMINE_DATABASE_MIGRATE_URL": settings.database_migrate_url or "",
            "SENSORMINE_STATE_DIR": str(settings.state_dir),
            "SENSORMINE_LAKE_URI": settings.lake_root,
            # Today's compaction every minute instead of every hour, so a scheduled run comes soon.
            "SENSORMINE_LAKE_COMPACTION_CRON": "* * * * *",
        }
    )
    return env, tmp_path / "dagster.log"


def test_daemon_adds_tenants_compacts_on_schedule_and_runs_a_ui_backfill(
    conn: psycopg.Connection, settings: Settings, dagster_env: tuple[dict[str, str], Path]
) -> None:
    env, log = dagster_env
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    ensure_partition_window(conn, today, settings)
    # Tenants are created through the registry only: nobody tells Dagster about them. They exist
    # before `dagster dev` starts, so the sensor's first tick (not one a minute later) can find them.
    make_tenant(conn, "acme", ["d1"])
    make_tenant(conn, "globex", ["d1"])
    writer = HotStoreWriter(conn)
    writer.write(day_readings("acme", today, 120) + day_readings("acme", yesterday, 50))
    writer.write(day_readings("globex", yesterday, 30))
    conn.commit()
    # Nothing is asked of Dagster after the checks: a run still in flight then (a scheduled tick's)
    # can hold up a graceful stop for the whole default grace of 30 s, so the group is killed sooner.
    with dagster_dev(env, free_port(), log, REPO, stop_timeout_s=5) as ui:
        assert_daemon_work(ui, log, settings, today, yesterday)


def assert_daemon_work(ui: DagsterWebserver, log: Path, settings: Settings, today: date, yesterday: date) -> None:
    """What the daemon of a running `dagster dev` does with the seeded tenants and readings."""
    # The daemon's tenant sensor makes both tenants partitions.
    tenants = eventually(
        lambda: (keys := ui.partition_keys(["lake", "telemetry"], "tenant")) == ["acme", "globex"] and keys,
        180,
        "both tenants to become partitions",
        log,
    )
    assert tenants == ["acme", "globex"]

    # A backfill of yesterday for both tenants, launched with the UI's mutation, runs meanwhile.
    backfill_id = ui.launch_backfill(TELEMETRY_ASSET_PATHS, [f"{yesterday}|acme", f"{yesterday}|globex"])

    # The compaction schedule launches a run of today for acme, which succeeds.
    scheduled = eventually(
        lambda: ui.runs(
            {"dagster/schedule_name": "telemetry_lake_hourly_schedule", "dagster/partition": f"{today}|acme"},
            statuses=["SUCCESS"],
        ),
        300,
        "a successful scheduled run of today's acme partition",
        log,
    )
    assert scheduled[0]["jobName"] == "telemetry_lake_job"

    status = eventually(
        lambda: (s := ui.backfill_status(backfill_id)) in TERMINAL_BACKFILL_STATES and s,
        400,
        f"backfill {backfill_id} to finish",
        log,
    )
    assert status == "COMPLETED_SUCCESS"

    acme = read_telemetry(settings, ["acme"]).to_pylist()
    globex = read_telemetry(settings, ["globex"]).to_pylist()
    assert sorted(r["ts"].date() for r in acme) == [yesterday] * 50 + [today] * 120
    assert [r["ts"].date() for r in globex] == [yesterday] * 30

    # Every sensor ticked under the daemon, and no tick failed.
    ticks = ui.ticks()
    for name in SENSORS:
        assert ticks[name], f"{name} never ticked"
        failed = [t for t in ticks[name] if t["status"] == "FAILURE"]
        assert not failed, f"{name}: {failed[0]['error']}"
    assert "Error occurred during the execution of evaluation_fn" not in log.read_text(errors="replace")
