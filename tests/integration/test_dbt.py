"""The dbt project over the lake: `dbt build` on a compacted Delta table (local folder and moto S3),
model outputs against an independent polars computation, a failing dbt test, the dagster-dbt assets.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
import psycopg
import pytest
from dagster_dbt.core.dbt_cli_invocation import DbtCliInvocation
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

from assets.dbt import (
    DBT_PROJECT_DIR,
    dbt_database_path,
    dbt_environment,
    dbt_process_environment,
    dbt_run_targets,
    ensure_manifest,
    manifest_is_current,
    project_fingerprint,
    sensormine_dbt_models,
)
from assets.telemetry import TELEMETRY_LAKE_KEY, telemetry_lake
from lake.storage import table_uri
from lake.telemetry import compact_day
from orchestration.dbt_resources import build_dbt_resource, dbt_models_daily_schedule, dbt_models_job
from orchestration.resources import HotStoreResource, LakeResource, resources_for
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.reading import QUALITY_BAD, Reading
from sensormine.settings import Settings
from tests.factories import DAY, DAY_US, make_tenant

pytestmark = pytest.mark.integration

D1 = DAY.date()
D2 = D1 + timedelta(days=1)
MINUTE_US = 60_000_000
DAY_LEN_US = 86_400_000_000
MODELS = {"stg_telemetry", "device_daily_stats", "tenant_usage"}
SERIES_KEYS = ["tenant_id", "device_id", "metric", "reading_date"]


def lake_readings() -> list[Reading]:
    """Two tenants over two days, with every case the models must handle.

    Irregular values and timestamps, all three quality codes, NaN and ±inf values, a series with
    a single reading (no sample stddev) and one whose only reading is NaN (no finite statistics).
    """
    out: list[Reading] = []
    for day_index in (0, 1):
        base = DAY_US + day_index * DAY_LEN_US
        for k, (tenant, device, metric, n) in enumerate(
            [
                ("acme", "d1", "temperature", 40),
                ("acme", "d1", "pressure", 25),
                ("acme", "d2", "temperature", 17),
                ("globex", "g1", "temperature", 30),
            ]
        ):
            for i in range(n - 3 * day_index):
                ts = base + i * 35 * MINUTE_US + (i * i * 7919) % MINUTE_US
                value = round(math.sin(i * 0.7 + k) * 50 + 20 + k * 100 + day_index, 6)
                if i % 11 == 5:
                    value = math.nan
                elif i == 13:
                    value = -math.inf if k % 2 else math.inf
                out.append(Reading(tenant, device, metric, ts, value, (i * 7 + k + day_index) % 3, ts + 1_000_000))
    out.append(Reading("acme", "d2", "humidity", DAY_US + 5 * MINUTE_US, 55.5, QUALITY_BAD, DAY_US + 6 * MINUTE_US))
    out.append(Reading("globex", "g1", "vibration", DAY_US + DAY_LEN_US + 1, math.nan, 0, DAY_US + DAY_LEN_US + 2))
    return out


def readings_frame(rows: list[Reading]) -> pl.DataFrame:
    """The readings as a frame with the UTC day of each, as the lake stores them."""
    frame = pl.DataFrame(
        [r._asdict() for r in rows],
        schema={
            "tenant_id": pl.String,
            "device_id": pl.String,
            "metric": pl.String,
            "ts": pl.Int64,
            "value": pl.Float64,
            "quality": pl.Int64,
            "ingest_ts": pl.Int64,
        },
    )
    ts = pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC")
    return frame.with_columns(ts.alias("ts"), ts.dt.date().alias("reading_date"))


def expected_device_daily_stats(rows: list[Reading]) -> pl.DataFrame:
    """device_daily_stats computed with polars from the readings themselves (not from the lake)."""
    frame = readings_frame(rows).sort("ts")
    finite = pl.col("value").is_finite()
    counts = frame.group_by(SERIES_KEYS).agg(
        pl.len().alias("readings"),
        finite.sum().alias("finite_readings"),
        (~finite).sum().alias("non_finite_readings"),
        pl.col("ts").min().alias("first_ts"),
        pl.col("ts").max().alias("last_ts"),
        (pl.col("quality") == QUALITY_BAD).sum().alias("bad_quality_readings"),
    )
    stats = (
        frame.filter(finite)
        .group_by(SERIES_KEYS)
        .agg(
            pl.col("value").min().alias("min_value"),
            pl.col("value").max().alias("max_value"),
            pl.col("value").mean().alias("avg_value"),
            pl.col("value").std(ddof=1).alias("stddev_value"),
            pl.col("value").first().alias("first_value"),
            pl.col("value").last().alias("last_value"),
        )
    )
    return (
        counts.join(stats, on=SERIES_KEYS, how="left")
        .with_columns((pl.col("bad_quality_readings") / pl.col("readings")).alias("bad_quality_share"))
        .select(
            *SERIES_KEYS,
            "readings",
            "finite_readings",
            "non_finite_readings",
            "min_value",
            "max_value",
            "avg_value",
            "stddev_value",
            "first_ts",
            "last_ts",
            "first_value",
            "last_value",
            "bad_quality_readings",
            "bad_quality_share",
        )
        .sort(SERIES_KEYS)
    )


def expected_tenant_usage(rows: list[Reading]) -> pl.DataFrame:
    """tenant_usage computed with polars from the readings themselves."""
    frame = readings_frame(rows)
    return (
        frame.group_by("tenant_id", "reading_date")
        .agg(
            pl.len().alias("readings"),
            pl.col("device_id").n_unique().alias("devices"),
            pl.col("metric").n_unique().alias("metrics"),
            pl.struct("device_id", "metric").n_unique().alias("series"),
            (pl.col("quality") == QUALITY_BAD).sum().alias("bad_quality_readings"),
        )
        .with_columns((pl.col("bad_quality_readings") / pl.col("readings")).alias("bad_quality_share"))
        .sort("tenant_id", "reading_date")
    )


def model(settings: Settings, name: str, order_by: list[str]) -> pl.DataFrame:
    """A model's table, read from the DuckDB file dbt built (timestamps as UTC)."""
    with duckdb.connect(str(dbt_database_path(settings)), read_only=True) as db:
        frame = db.sql(f"SELECT * FROM main.{name} ORDER BY {', '.join(order_by)}").pl()
    return frame.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC"))


def model_exists(settings: Settings, name: str) -> bool:
    """Whether the DuckDB file holds a table `name`."""
    with duckdb.connect(str(dbt_database_path(settings)), read_only=True) as db:
        found = db.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()
    return bool(found and found[0])


def assert_models_match(settings: Settings, rows: list[Reading]) -> None:
    """Both marts equal the independent computation: integers exactly, floats to 1e-12."""
    stats = model(settings, "device_daily_stats", SERIES_KEYS)
    want_stats = expected_device_daily_stats(rows)
    assert stats.columns == want_stats.columns
    assert_frame_equal(stats, want_stats, check_dtypes=False, rel_tol=1e-12, abs_tol=1e-9)
    usage = model(settings, "tenant_usage", ["tenant_id", "reading_date"])
    assert_frame_equal(usage, expected_tenant_usage(rows), check_dtypes=False, rel_tol=1e-12)


def dbt_build(settings: Settings, target: Path) -> DbtCliInvocation:
    """`dbt build` through DbtCliResource, pointed at the settings' lake; waits for it to finish."""
    dbt_database_path(settings).parent.mkdir(parents=True, exist_ok=True)
    with dbt_process_environment(settings):
        invocation = build_dbt_resource().cli(["build"], raise_on_error=False, target_path=target)
    return invocation.wait()


def results_by_name(invocation: DbtCliInvocation) -> dict[str, dict[str, Any]]:
    """run_results.json entries keyed by node name."""
    results = invocation.get_artifact("run_results.json")["results"]
    return {r["unique_id"].split(".")[2]: r for r in results}


def write_lake(conn: psycopg.Connection, settings: Settings, rows: list[Reading]) -> None:
    """The readings, in the hot store and compacted tenant-day by tenant-day into the lake."""
    make_tenant(conn, "acme", ["d1", "d2"])
    make_tenant(conn, "globex", ["g1"])
    HotStoreWriter(conn).write(rows)
    total = sum(compact_day(conn, settings, tenant, day).rows for tenant in ("acme", "globex") for day in (D1, D2))
    assert total == len(rows)


def assert_known_values(settings: Settings) -> None:
    """A few values worked out by hand, so a mistake shared by the models and polars would still show."""
    usage = model(settings, "tenant_usage", ["tenant_id", "reading_date"])
    assert usage.select("tenant_id", "reading_date", "readings", "devices", "metrics", "series").rows() == [
        ("acme", D1, 40 + 25 + 17 + 1, 2, 3, 4),
        ("acme", D2, 37 + 22 + 14, 2, 2, 3),
        ("globex", D1, 30, 1, 1, 1),
        ("globex", D2, 27 + 1, 1, 2, 2),
    ]
    stats = model(settings, "device_daily_stats", SERIES_KEYS)
    humidity = stats.filter(pl.col("metric") == "humidity").row(0, named=True)
    assert (humidity["readings"], humidity["min_value"], humidity["stddev_value"]) == (1, 55.5, None)
    assert (humidity["bad_quality_readings"], humidity["bad_quality_share"]) == (1, 1.0)
    vibration = stats.filter(pl.col("metric") == "vibration").row(0, named=True)
    assert (vibration["readings"], vibration["non_finite_readings"], vibration["avg_value"]) == (1, 1, None)
    d1 = stats.filter((pl.col("device_id") == "d1") & (pl.col("metric") == "pressure") & (pl.col("reading_date") == D1))
    # i = 5 and 16 are NaN, i = 13 is -inf (k = 1): 25 readings, 22 finite.
    assert d1.select("readings", "finite_readings", "non_finite_readings").row(0) == (25, 22, 3)


@pytest.mark.parametrize("lake_settings", ["s3"], indirect=True)
def test_dbt_build_on_s3_matches_an_independent_computation(
    conn: psycopg.Connection, lake_settings: Settings, tmp_path: Path
) -> None:
    """The dbt CLI (through DbtCliResource) over a lake in a moto S3 bucket: models and tests run."""
    rows = lake_readings()
    write_lake(conn, lake_settings, rows)
    assert lake_settings.lake_root.startswith("s3://")

    invocation = dbt_build(lake_settings, tmp_path / "target")

    assert invocation.is_successful(), invocation.get_error()
    results = results_by_name(invocation)
    models = {name for name, r in results.items() if r["unique_id"].startswith("model.")}
    tests = {name: r for name, r in results.items() if r["unique_id"].startswith("test.")}
    assert models == MODELS
    assert all(results[m]["status"] == "success" for m in MODELS)
    assert len(tests) >= 30 and all(t["status"] == "pass" for t in tests.values())
    assert "assert_tenant_usage_matches_readings" in tests
    assert_models_match(lake_settings, rows)
    assert_known_values(lake_settings)


def dagster_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The dbt resource of the Definitions, and a lake resource for the test's folder and state dir."""
    return {**resources_for(settings), "dbt": build_dbt_resource()}


def test_materialize_dbt_assets_through_dagster(conn: psycopg.Connection, settings: Settings) -> None:
    """The dagster-dbt assets over a lake folder: every model materialised, every dbt test a passing check."""
    rows = lake_readings()
    write_lake(conn, settings, rows)

    result = dg.materialize([sensormine_dbt_models], resources=dagster_resources(settings))

    assert result.success
    materialized = {m.asset_key for m in result.get_asset_materialization_events() if m.asset_key}
    assert materialized == {dg.AssetKey(["dbt", name]) for name in MODELS}
    checks = result.get_asset_check_evaluations()
    assert {c.asset_check_key for c in checks} == set(sensormine_dbt_models.check_keys)
    assert len(checks) >= 30
    assert all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]
    # dbt's artefacts of the run went to the state directory, not into the repository.
    [run_target] = list(dbt_run_targets(settings).iterdir())
    assert (run_target / "run_results.json").is_file()
    assert_models_match(settings, rows)
    assert_known_values(settings)
    # With a telemetry table in the lake, the daily schedule asks for the dbt run.
    assert isinstance(evaluate_daily_schedule(settings), dg.RunRequest)


def evaluate_daily_schedule(settings: Settings) -> dg.RunRequest | dg.SkipReason:
    """One tick of dbt_models_daily_schedule at 01:30 UTC after DAY, against the settings' lake."""
    lake = resources_for(settings)["lake"]
    tick = DAY + timedelta(days=1, hours=1, minutes=30)
    with dg.build_schedule_context(scheduled_execution_time=tick, resources={"lake": lake}) as context:
        return dbt_models_daily_schedule(context)


def test_a_failing_dbt_test_fails_its_check_and_stops_downstream_models(
    conn: psycopg.Connection, settings: Settings
) -> None:
    rows = lake_readings()
    write_lake(conn, settings, rows)
    # A second copy of one reading, written around compaction: the lake now breaks the dedupe key.
    table = DeltaTable(table_uri(settings, "telemetry"))
    write_deltalake(table, table.to_pyarrow_table().slice(0, 1), mode="append")

    result = dg.materialize(
        [sensormine_dbt_models],
        resources=dagster_resources(settings),
        raise_on_error=False,
    )

    assert not result.success
    failed = [c for c in result.get_asset_check_evaluations() if not c.passed]
    assert [(c.asset_key, c.check_name) for c in failed] == [
        (dg.AssetKey(["dbt", "stg_telemetry"]), "stg_telemetry_one_row_per_reading")
    ]
    # dbt build skips everything downstream of a failing test: no stale mart is rebuilt from bad data.
    materialized = {m.asset_key for m in result.get_asset_materialization_events() if m.asset_key}
    assert materialized == {dg.AssetKey(["dbt", "stg_telemetry"])}
    assert model_exists(settings, "stg_telemetry")
    assert not model_exists(settings, "device_daily_stats") and not model_exists(settings, "tenant_usage")


def test_dbt_assets_join_the_lake_lineage() -> None:
    defs = dg.Definitions(
        assets=[telemetry_lake, sensormine_dbt_models],
        jobs=[dbt_models_job],
        schedules=[dbt_models_daily_schedule],
        resources={
            "dbt": build_dbt_resource(),
            "lake": LakeResource(),
            "hot_store": HotStoreResource(database_url="postgresql://unused"),
        },
    )
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {dg.AssetKey(["dbt", name]) for name in MODELS}
    assert keys <= graph.get_all_asset_keys()
    assert {graph.get(k).group_name for k in keys} == {"dbt"}
    # The dbt source is the telemetry asset itself, not a stand-in: one lineage graph.
    assert graph.get(TELEMETRY_LAKE_KEY).is_materializable
    assert dg.AssetKey(["dbt", "stg_telemetry"]) in graph.get(TELEMETRY_LAKE_KEY).child_keys
    assert graph.get(dg.AssetKey(["dbt", "tenant_usage"])).parent_keys == {dg.AssetKey(["dbt", "device_daily_stats"])}
    assert {"dagster/kind/dbt", "dagster/kind/duckdb"} <= set(graph.get(dg.AssetKey(["dbt", "tenant_usage"])).tags)
    check_names = {c.name for c in sensormine_dbt_models.check_keys}
    assert {"device_daily_stats_one_row_per_series_day", "assert_tenant_usage_matches_readings"} <= check_names
    assert defs.resolve_job_def("dbt_models_job").asset_layer.selected_asset_keys == keys
    assert defs.resolve_schedule_def("dbt_models_daily_schedule").cron_schedule == "30 1 * * *"
    # The resource knows this environment's dbt version without running `dbt --version`.
    assert str(build_dbt_resource()._cli_version) == version("dbt-core")


def test_daily_schedule_skips_until_the_lake_has_telemetry(settings: Settings) -> None:
    skip = evaluate_daily_schedule(settings)
    assert isinstance(skip, dg.SkipReason)
    assert skip.skip_message and "no telemetry table" in skip.skip_message


def test_dbt_environment_maps_settings_for_local_and_s3(settings: Settings) -> None:
    local = dbt_environment(settings)
    assert local == {
        "SENSORMINE_LAKE_URI": settings.lake_root,
        "SENSORMINE_STATE_DIR": str(settings.state_dir.resolve()),
        "SENSORMINE_DBT_DATABASE": str(settings.state_dir.resolve() / "dbt.duckdb"),
    }
    s3 = dbt_environment(settings.model_copy(update={"lake_uri": "s3://bucket/lake/"}))
    assert s3["SENSORMINE_LAKE_URI"] == "s3://bucket/lake"
    assert s3["AWS_ENDPOINT_URL"] == settings.s3_endpoint
    assert s3["AWS_ACCESS_KEY_ID"] == settings.s3_access_key
    assert s3["AWS_SECRET_ACCESS_KEY"] == settings.s3_secret_key
    assert s3["AWS_ALLOW_HTTP"] == "true"


def test_manifest_is_parsed_when_missing_and_reused_while_current(tmp_path: Path) -> None:
    project = tmp_path / "dbt"
    shutil.copytree(DBT_PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))

    manifest = ensure_manifest(project)

    assert manifest == project / "target" / "dagster" / "manifest.json"
    nodes = json.loads(manifest.read_text())["nodes"]
    assert {"model.sensormine.device_daily_stats", "model.sensormine.tenant_usage"} <= set(nodes)
    stamp = manifest.stat().st_mtime_ns
    assert ensure_manifest(project) == manifest
    assert manifest.stat().st_mtime_ns == stamp  # current: not parsed again
    assert not list(manifest.parent.glob("parse-*"))  # the scratch folder is gone

    sql = project / "models" / "marts" / "tenant_usage.sql"
    sql.write_text(sql.read_text() + "\n-- edited\n")
    assert not manifest_is_current(manifest.parent, project_fingerprint(project))
