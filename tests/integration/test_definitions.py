"""The Dagster entry point loads; its sensors and schedules tick as the daemon evaluates them; the asset compacts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest

from assets.anomaly import ANOMALY_MODELS_KEY, ANOMALY_SCORES_KEY
from assets.rollups import TELEMETRY_1H_KEY, TELEMETRY_1M_KEY
from assets.telemetry import TELEMETRY_LAKE_KEY, telemetry_lake, telemetry_partition_key
from assets.usage import INVOICE_PREVIEW_KEY, STRIPE_USAGE_REPORT_KEY, USAGE_DAILY_KEY, USAGE_MONTHLY_KEY
from lake.telemetry import read_telemetry
from orchestration.definitions import defs
from orchestration.resources import resources_for
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.reading import readings_to_table
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant
from tests.factories import DAY, DAY_US, make_tenant, readings, schedule_tick, sensor_tick

pytestmark = pytest.mark.integration


def test_definitions_load_with_the_expected_objects() -> None:
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert TELEMETRY_LAKE_KEY in graph.get_all_asset_keys()
    assert dg.AssetKey(["lake", "telemetry"]) == TELEMETRY_LAKE_KEY
    node = graph.get(TELEMETRY_LAKE_KEY)
    assert {"dagster/kind/deltalake", "dagster/kind/postgres"} <= set(node.tags)
    assert node.partitions_def is not None
    assert {TELEMETRY_1M_KEY, TELEMETRY_1H_KEY} <= graph.get_all_asset_keys()
    assert graph.get(TELEMETRY_1M_KEY).parent_keys == {TELEMETRY_LAKE_KEY}
    assert graph.get(TELEMETRY_1H_KEY).parent_keys == {TELEMETRY_1M_KEY}
    job = defs.resolve_job_def("telemetry_lake_job")
    assert job.asset_layer.selected_asset_keys == {TELEMETRY_LAKE_KEY, TELEMETRY_1M_KEY, TELEMETRY_1H_KEY}
    assert defs.resolve_job_def("lake_housekeeping_job") is not None
    assert defs.resolve_job_def("dbt_models_job") is not None
    dbt_keys = {dg.AssetKey(["dbt", m]) for m in ("stg_telemetry", "device_daily_stats", "tenant_usage")}
    assert dbt_keys <= graph.get_all_asset_keys()
    assert graph.get(dg.AssetKey(["dbt", "stg_telemetry"])).parent_keys == {TELEMETRY_LAKE_KEY}
    checks = {k.name for k in graph.asset_check_keys if k.asset_key == TELEMETRY_LAKE_KEY}
    assert checks >= {"keys_not_null", "rows_in_partition", "values_in_schema_range", "dedupe_key_unique"}
    assert {"hot_lake_parity", "freshness"} <= checks
    assert graph.get(ANOMALY_SCORES_KEY).parent_keys == {TELEMETRY_LAKE_KEY, ANOMALY_MODELS_KEY}
    assert graph.get(ANOMALY_SCORES_KEY).partitions_def == graph.get(TELEMETRY_LAKE_KEY).partitions_def
    assert graph.get(ANOMALY_MODELS_KEY).partitions_def is None
    assert {k.name for k in graph.asset_check_keys if k.asset_key == ANOMALY_SCORES_KEY} == {"anomaly_scores_complete"}
    assert defs.resolve_job_def("anomaly_scores_job") is not None
    assert defs.resolve_job_def("anomaly_models_job") is not None
    assert graph.get(USAGE_DAILY_KEY).parent_keys == {TELEMETRY_LAKE_KEY}
    assert graph.get(STRIPE_USAGE_REPORT_KEY).parent_keys == {USAGE_DAILY_KEY}
    assert {k.name for k in graph.asset_check_keys if k.asset_key == USAGE_DAILY_KEY} == {"matches_in_both_stores"}
    assert graph.get(USAGE_MONTHLY_KEY).parent_keys == {USAGE_DAILY_KEY}
    assert graph.get(INVOICE_PREVIEW_KEY).parent_keys == {USAGE_MONTHLY_KEY}
    assert {k.name for k in graph.asset_check_keys if k.asset_key == USAGE_MONTHLY_KEY} == {"equals_daily_sums"}
    usage = defs.resolve_job_def("usage_job")
    assert usage.asset_layer.selected_asset_keys == {USAGE_DAILY_KEY, STRIPE_USAGE_REPORT_KEY}
    crons = {s.name: s.cron_schedule for s in defs.schedules or []}
    assert crons == {
        "telemetry_lake_hourly_schedule": "5 * * * *",
        "telemetry_lake_daily_close_schedule": "30 0 * * *",
        "lake_housekeeping_schedule": "30 3 * * *",
        "dbt_models_daily_schedule": "30 1 * * *",
        "anomaly_scores_daily_schedule": "0 1 * * *",
        "anomaly_models_weekly_schedule": "0 2 * * 0",
        "usage_daily_schedule": "30 1 * * *",
        "billing_month_to_date_schedule": "0 2 * * *",
        "billing_month_close_schedule": "30 2 1 * *",
    }
    sensors = {s.name for s in defs.sensors or []}
    assert sensors == {"tenant_partitions_sensor", "hot_data_sensor", "failed_quality_checks_sensor"}
    assert set(defs.resources or {}) >= {"hot_store", "lake", "stripe"}


def test_materialize_compacts_one_tenant_day(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1"])
    make_tenant(conn, "globex", ["d1"])
    rows = readings("acme", "d1", 24, step_us=3_600_000_000)
    HotStoreWriter(conn).write(rows + readings("globex", "d1", 5))
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme", "globex"])

        result = dg.materialize(
            [telemetry_lake],
            partition_key=telemetry_partition_key("acme", DAY.date()),
            resources=resources_for(settings),
            instance=instance,
        )

        assert result.success
        [mat] = result.asset_materializations_for_node("lake__telemetry")
        assert mat.partition == "2026-11-26|acme"
        assert mat.metadata["rows"].value == len(rows)
        assert mat.metadata["table_version"].value == 1
        assert mat.metadata["uri"].value == f"{settings.lake_root}/telemetry"
        assert mat.metadata["hot_watermark"].value == DAY_US / 1e6
        sort = [("device_id", "ascending"), ("metric", "ascending"), ("ts", "ascending")]
        assert read_telemetry(settings, ["acme"]).equals(readings_to_table(rows).sort_by(sort))
        assert read_telemetry(settings, ["globex"]).num_rows == 0
        assert conn.execute("SELECT tenant_id, row_count FROM lake_compactions").fetchall() == [("acme", len(rows))]


def test_tenant_sensor_adds_new_tenants_and_leaves_a_cursor(
    conn: psycopg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch, dagster_instance: dg.DagsterInstance
) -> None:
    # The Definitions' hot_store resource reads its database from the environment at each tick.
    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", settings.database_migrate_url or "")
    create_tenant(conn, "globex")
    create_tenant(conn, "acme")
    conn.commit()
    instance = dagster_instance

    first = sensor_tick("tenant_partitions_sensor", instance)
    [request] = first.dynamic_partitions_requests or []
    assert isinstance(request, dg.AddDynamicPartitionsRequest)
    assert (request.partitions_def_name, list(request.partition_keys)) == ("tenants", ["acme", "globex"])
    assert json.loads(first.cursor or "") == ["acme", "globex"]
    assert not first.run_requests
    instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))

    # Nothing new: no request, same cursor.
    second = sensor_tick("tenant_partitions_sensor", instance, first.cursor)
    assert not second.dynamic_partitions_requests
    assert second.skip_message == "all 2 tenants already have partitions"
    assert second.cursor == first.cursor

    # A new tenant, plus one deleted from the instance by hand: both come back, nothing is removed.
    create_tenant(conn, "initech")
    conn.commit()
    instance.delete_dynamic_partition("tenants", "globex")
    third = sensor_tick("tenant_partitions_sensor", instance, second.cursor)
    [request] = third.dynamic_partitions_requests or []
    assert isinstance(request, dg.AddDynamicPartitionsRequest)
    assert list(request.partition_keys) == ["globex", "initech"]
    assert json.loads(third.cursor or "") == ["acme", "globex", "initech"]


SENSORS = sorted(s.name for s in defs.sensors or [])
SCHEDULES = sorted(s.name for s in defs.schedules or [])


@pytest.mark.parametrize("name", SENSORS)
def test_every_sensor_ticks_as_the_daemon_runs_it(
    name: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, dagster_instance: dg.DagsterInstance
) -> None:
    """Regression: the daemon called sensors without a Protocol-typed resource parameter (a TypeError each tick)."""
    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", settings.database_migrate_url or "")
    data = sensor_tick(name, dagster_instance)
    assert not data.run_requests
    assert data.skip_message or data.dynamic_partitions_requests is not None


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_ticks_as_the_daemon_runs_it(name: str, dagster_instance: dg.DagsterInstance) -> None:
    dagster_instance.add_dynamic_partitions("tenants", ["acme"])
    data = schedule_tick(name, dagster_instance, DAY.replace(hour=3, minute=30))
    assert data.run_requests or data.skip_message


def test_hourly_schedule_requests_today_for_every_tenant(dagster_instance: dg.DagsterInstance) -> None:
    instance = dagster_instance
    instance.add_dynamic_partitions("tenants", ["globex", "acme"])
    noon = DAY.replace(hour=12, minute=0)

    data = schedule_tick("telemetry_lake_hourly_schedule", instance, noon)
    keys = [r.partition_key for r in data.run_requests or []]
    assert keys == ["2026-11-26|acme", "2026-11-26|globex"]
    assert all(r.job_name in (None, "telemetry_lake_job") for r in data.run_requests or [])

    # Just after midnight the hourly tick starts the new day; the daily close takes yesterday.
    after_midnight = datetime(2026, 11, 27, 0, 30, tzinfo=UTC)
    hourly = schedule_tick("telemetry_lake_hourly_schedule", instance, after_midnight)
    daily = schedule_tick("telemetry_lake_daily_close_schedule", instance, after_midnight)
    assert [r.partition_key for r in hourly.run_requests or []] == ["2026-11-27|acme", "2026-11-27|globex"]
    yesterday = (after_midnight - timedelta(days=1)).date().isoformat()
    assert [r.partition_key for r in daily.run_requests or []] == [f"{yesterday}|acme", f"{yesterday}|globex"]


def test_anomaly_schedules_score_yesterday_and_retrain_weekly(dagster_instance: dg.DagsterInstance) -> None:
    dagster_instance.add_dynamic_partitions("tenants", ["globex", "acme"])
    one_am = datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
    scores = schedule_tick("anomaly_scores_daily_schedule", dagster_instance, one_am)
    assert [r.partition_key for r in scores.run_requests or []] == ["2026-11-26|acme", "2026-11-26|globex"]
    sunday = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    (training,) = schedule_tick("anomaly_models_weekly_schedule", dagster_instance, sunday).run_requests or []
    assert training.run_key == "anomaly-models-2026-11-29" and not training.partition_key


def test_usage_schedules_roll_up_yesterday_and_the_months_for_every_tenant(
    dagster_instance: dg.DagsterInstance,
) -> None:
    dagster_instance.add_dynamic_partitions("tenants", ["globex", "acme"])
    tick = datetime(2026, 12, 1, 1, 30, tzinfo=UTC)
    data = schedule_tick("usage_daily_schedule", dagster_instance, tick)
    assert [r.partition_key for r in data.run_requests or []] == ["2026-11-30|acme", "2026-11-30|globex"]
    to_date = schedule_tick("billing_month_to_date_schedule", dagster_instance, tick.replace(hour=2, minute=0))
    assert [r.partition_key for r in to_date.run_requests or []] == ["2026-12-01|acme", "2026-12-01|globex"]
    close = schedule_tick("billing_month_close_schedule", dagster_instance, tick.replace(hour=2, minute=30))
    assert [r.partition_key for r in close.run_requests or []] == ["2026-11-01|acme", "2026-11-01|globex"]


def test_hourly_schedule_skips_without_tenants(dagster_instance: dg.DagsterInstance) -> None:
    instance = dagster_instance
    data = schedule_tick("telemetry_lake_hourly_schedule", instance, DAY)
    assert not data.run_requests
    assert data.skip_message and "no tenant partitions" in data.skip_message
