"""Data quality on real PostgreSQL and Delta tables: device schemas, parity, freshness, Dagster checks, sensor."""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import dagster as dg
import psycopg
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData
from deltalake import DeltaTable

from assets.quality import (
    FRESHNESS_CHECK_NAME,
    PARITY_CHECK_NAME,
    telemetry_quality_checks,
)
from assets.telemetry import TELEMETRY_LAKE_KEY, telemetry_lake, telemetry_partition_key, telemetry_partitions
from expectations.telemetry import CHECK_DESCRIPTIONS, VALUES_IN_SCHEMA_RANGE
from lake.quality import check_freshness, check_parity, lake_row_count, parity_diff
from lake.storage import table_uri
from lake.telemetry import compact_day
from orchestration.resources import HotStoreResource, resources_for
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import INGEST, connect, tenant_scope
from sensormine.devices.registry import create_device
from sensormine.reading import Reading, now_us, us_to_datetime
from sensormine.schemas.compat import SchemaError
from sensormine.schemas.ranges import metric_ranges
from sensormine.schemas.store import register_schema
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant
from sensors.quality import RECOMPACTION_TAG, failed_quality_checks_sensor
from tests.factories import DAY, DAY_US, make_tenant, readings, sensor_tick

pytestmark = pytest.mark.integration

D = DAY.date()
HOUR_US = 3_600_000_000
PARTITION = "2026-11-26|acme"


def bounds(metric: str, **spec: float) -> dict:
    """A schema declaring only the bounds of one metric."""
    return {"properties": {"values": {"properties": {metric: spec}}}}


THERMO = {
    "type": "object",
    "properties": {
        "ts": {},
        "values": {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": -40, "maximum": 50},
                "pressure": {"type": "number", "exclusiveMinimum": 0},
            },
        },
    },
}


def day_rows(tenant_id: str = "acme", devices: tuple[str, ...] = ("d1", "d2"), n: int = 12) -> list[Reading]:
    """n readings x 2 metrics per device, every 2 hours of day D, values well inside THERMO's ranges."""
    out: list[Reading] = []
    for device in devices:
        out += [
            r._replace(value=1.0 + r.value, ingest_ts=r.ts + 1_000_000)
            for r in readings(tenant_id, device, n, step_us=2 * HOUR_US)
        ]
    return out


def compactions(conn: psycopg.Connection) -> list[tuple]:
    """(tenant, day, row_count, verified_rows, verified) of every compaction; ends the read's transaction."""
    rows = conn.execute(
        "SELECT tenant_id, day, row_count, verified_rows, verified_at IS NOT NULL FROM lake_compactions ORDER BY 1, 2"
    ).fetchall()
    conn.commit()
    return rows


# -- device schemas -----------------------------------------------------------------------------


def test_schema_versions_and_metric_ranges(conn: psycopg.Connection) -> None:
    create_tenant(conn, "acme")
    create_tenant(conn, "globex")
    create_device(conn, "acme", "t1", device_type="thermo")
    create_device(conn, "acme", "t2", device_type="thermo")
    create_device(conn, "acme", "m1", device_type="meter")  # a type without a schema
    create_device(conn, "acme", "x1")  # no type
    create_device(conn, "globex", "g1", device_type="thermo")

    assert register_schema(conn, "acme", "thermo", {"type": "object"}) == 1
    assert register_schema(conn, "acme", "thermo", THERMO) == 2
    assert register_schema(conn, "globex", "thermo", bounds("t", maximum=1)) == 1

    ranges = metric_ranges(conn, "acme")
    thermo = {"temperature": (-40.0, 50.0), "pressure": (math.nextafter(0.0, math.inf), None)}
    assert ranges == {"t1": thermo, "t2": thermo}
    assert metric_ranges(conn, "globex") == {"g1": {"t": (None, 1.0)}}
    assert metric_ranges(conn, "initech") == {}
    stored = conn.execute(
        "SELECT tenant_id, device_type, version, definition FROM device_schemas ORDER BY 1, 2, 3"
    ).fetchall()
    assert [row[:3] for row in stored] == [("acme", "thermo", 1), ("acme", "thermo", 2), ("globex", "thermo", 1)]
    assert stored[1][3] == THERMO

    # A newer version of the type changes the ranges of every device of that type.
    register_schema(  # replaces the schema outright (drops pressure and the types): forced
        conn,
        "acme",
        "thermo",
        {"properties": {"values": {"properties": {"temperature": {"maximum": 80}}}}},
        force=True,
    )
    assert metric_ranges(conn, "acme")["t1"] == {"temperature": (None, 80.0)}

    # Row-level security: a tenant's readers see only its own schemas.
    with tenant_scope(conn, ["globex"]):
        assert conn.execute("SELECT tenant_id, version FROM device_schemas").fetchall() == [("globex", 1)]


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ("{}", "must be a JSON object"),
        ({"properties": {"values": {"properties": {"t": {"maximum": "hot"}}}}}, "t.maximum must be a finite number"),
        ({"properties": {"values": {"properties": {"t": {"minimum": True}}}}}, "t.minimum must be a finite number"),
    ],
)
def test_register_schema_refuses_bad_definitions(conn: psycopg.Connection, definition: object, message: str) -> None:
    create_tenant(conn, "acme")
    with pytest.raises(SchemaError, match=message):
        register_schema(conn, "acme", "thermo", definition)
    assert conn.execute("SELECT count(*) FROM device_schemas").fetchone() == (0,)


def test_register_schema_for_an_unknown_tenant(conn: psycopg.Connection) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        register_schema(conn, "nobody", "thermo", THERMO)
    with pytest.raises(SchemaError, match="device type"):
        register_schema(conn, "nobody", "", THERMO)


# -- parity -------------------------------------------------------------------------------------


def test_parity_passes_and_records_the_verification(conn: psycopg.Connection, lake_settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_rows()
    HotStoreWriter(conn).write(rows)
    compacted = compact_day(conn, lake_settings, "acme", D)

    result = check_parity(conn, lake_settings, "acme", D)

    assert result.passed, result.reason
    assert (result.lake_rows, result.recorded_rows, result.hot_rows, result.late_rows) == (48, 48, 48, 0)
    assert result.table_version == compacted.table_version
    assert result.verified_at is not None
    assert compactions(conn) == [("acme", D, 48, 48, True)]
    assert conn.execute("SELECT verified_at FROM lake_compactions").fetchone() == (result.verified_at,)
    assert lake_row_count(lake_settings, "acme", D) == 48


def test_late_rows_after_the_compaction_are_not_a_mismatch(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    HotStoreWriter(conn).write(day_rows())
    # A transaction that has written rows but not committed when the compaction reads the day...
    with connect(settings, role=INGEST) as other:
        other.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value) VALUES ('acme', 'd1', 'late', %s, 1.0)",
            (us_to_datetime(DAY_US + 5),),
        )
        compact_day(conn, settings, "acme", D)
        other.commit()
    # ...and rows arriving after it: both wait for the next compaction.
    HotStoreWriter(conn).write([Reading("acme", "d2", "late", DAY_US + 7 * HOUR_US, 2.0, 0, DAY_US)])

    result = check_parity(conn, settings, "acme", D)

    assert result.passed, result.reason
    assert (result.lake_rows, result.recorded_rows, result.hot_rows, result.late_rows) == (48, 48, 48, 2)
    assert "2 late row(s)" in result.reason
    assert compactions(conn) == [("acme", D, 48, 48, True)]

    # The next compaction folds them in, which clears the old verification until checked again.
    compact_day(conn, settings, "acme", D)
    assert compactions(conn) == [("acme", D, 50, None, False)]
    result = check_parity(conn, settings, "acme", D)
    assert (result.passed, result.lake_rows, result.late_rows) == (True, 50, 0)
    assert compactions(conn) == [("acme", D, 50, 50, True)]


def test_parity_fails_when_the_lake_partition_lost_rows(conn: psycopg.Connection, lake_settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_rows()
    HotStoreWriter(conn).write(rows)
    compact_day(conn, lake_settings, "acme", D)
    assert check_parity(conn, lake_settings, "acme", D).passed
    # Another writer deletes part of the partition.
    uri = table_uri(lake_settings, "telemetry")
    DeltaTable(uri, storage_options=lake_settings.storage_options()).delete("device_id = 'd2' AND metric = 'pressure'")

    result = check_parity(conn, lake_settings, "acme", D)

    assert not result.passed
    assert (result.lake_rows, result.recorded_rows, result.hot_rows) == (36, 48, 48)
    assert result.reason.startswith("mismatch: lake has 36 rows, compaction recorded 48, hot store had 48")
    assert result.verified_at is None
    assert compactions(conn) == [("acme", D, 48, None, False)]  # the earlier verification is withdrawn

    diff = parity_diff(conn, lake_settings, "acme", D)
    missing = sorted((r for r in rows if r.device_id == "d2" and r.metric == "pressure"), key=lambda r: r.ts)
    assert diff == [
        {"side": "missing_from_lake", "device_id": "d2", "metric": "pressure", "ts": us_to_datetime(r.ts).isoformat(),
         "value": r.value}
        for r in missing
    ]  # fmt: skip


def test_parity_fails_when_hot_rows_vanish_and_without_a_compaction(
    conn: psycopg.Connection, settings: Settings
) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    HotStoreWriter(conn).write(day_rows())
    not_yet = check_parity(conn, settings, "acme", D)
    assert (not_yet.passed, not_yet.recorded_rows) == (False, None)
    assert "not been compacted" in not_yet.reason

    compact_day(conn, settings, "acme", D)
    with conn.transaction():
        conn.execute("DELETE FROM telemetry WHERE device_id = 'd1' AND metric = 'temperature' AND ts = %s", (DAY,))
    result = check_parity(conn, settings, "acme", D)
    assert not result.passed
    assert (result.lake_rows, result.recorded_rows, result.hot_rows) == (48, 48, 47)
    assert parity_diff(conn, settings, "acme", D) == [
        {"side": "only_in_lake", "device_id": "d1", "metric": "temperature", "ts": DAY.isoformat(), "value": 1.0}
    ]


def test_parity_of_a_day_without_hot_rows(conn: psycopg.Connection, settings: Settings) -> None:
    create_tenant(conn, "acme")
    compact_day(conn, settings, "acme", D)  # nothing in the hot store, not even the day's partition
    result = check_parity(conn, settings, "acme", D)
    assert result.passed, result.reason
    assert (result.lake_rows, result.recorded_rows, result.hot_rows) == (0, 0, None)
    assert compactions(conn) == [("acme", D, 0, 0, True)]


# -- freshness ----------------------------------------------------------------------------------


def test_freshness_of_the_newest_compaction_and_reading(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1"])
    create_tenant(conn, "globex")
    never = check_freshness(conn, "globex")
    assert not never.passed
    assert never.reason.startswith("no day of the tenant has been compacted; the lake holds no reading")

    rows = readings("acme", "d1", 3, step_us=HOUR_US)
    arrived = now_us()
    HotStoreWriter(conn).write([r._replace(ingest_ts=arrived - i) for i, r in enumerate(rows)])
    compact_day(conn, settings, "acme", D)
    compacted_at = conn.execute("SELECT compacted_at FROM lake_compactions").fetchone()[0]  # type: ignore[index]

    fresh = check_freshness(conn, "acme", max_age=timedelta(hours=3), now=compacted_at + timedelta(hours=1))
    stale = check_freshness(conn, "acme", max_age=timedelta(hours=3), now=compacted_at + timedelta(hours=4))

    assert (fresh.last_compacted_at, fresh.newest_reading_at) == (compacted_at, us_to_datetime(arrived))
    assert fresh.passed, fresh.reason
    assert fresh.compaction_age == timedelta(hours=1)
    assert not stale.passed
    assert stale.compaction_age == timedelta(hours=4)
    assert stale.reason.startswith("last compaction 4:00:00 ago; newest reading in the lake arrived 4:00:")
    assert stale.reason.endswith("(threshold 3:00:00)")


# -- Dagster: checks in the compaction run ------------------------------------------------------


@dg.asset(
    key=["test", "telemetry_rollup"],
    partitions_def=telemetry_partitions,
    deps=[TELEMETRY_LAKE_KEY],
)
def rollup_stub(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """A downstream asset standing in for the rollups: runs only when the blocking checks pass."""
    return dg.MaterializeResult(metadata={"partition": str(context.partition_key)})


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_blocking_check_failure_stops_downstream_and_a_fix_lets_it_run(
    conn: psycopg.Connection, settings: Settings
) -> None:
    create_tenant(conn, "acme")
    create_device(conn, "acme", "d1", device_type="thermo")
    create_device(conn, "acme", "d2", device_type="thermo")
    register_schema(conn, "acme", "thermo", THERMO)
    rows = day_rows()
    rows[4] = rows[4]._replace(value=80.5)  # d1 temperature above the schema's maximum of 50
    HotStoreWriter(conn).write(rows)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme"])
        key = telemetry_partition_key("acme", D)

        failed = dg.materialize(
            [telemetry_lake, *telemetry_quality_checks, rollup_stub],
            partition_key=key,
            resources=resources_for(settings),
            instance=instance,
            raise_on_error=False,
        )

        assert not failed.success
        [mat] = failed.asset_materializations_for_node("lake__telemetry")
        assert mat.partition == PARTITION
        assert failed.asset_materializations_for_node("test__telemetry_rollup") == []
        checks = evaluations(failed)
        assert set(checks) == {*CHECK_DESCRIPTIONS, PARITY_CHECK_NAME, FRESHNESS_CHECK_NAME}
        assert all(e.partition == PARTITION for e in checks.values())
        assert {n: e.passed for n, e in checks.items() if n in CHECK_DESCRIPTIONS} == {
            "keys_not_null": True,
            "rows_in_partition": True,
            "values_in_schema_range": False,
            "dedupe_key_unique": True,
        }
        bad = checks[VALUES_IN_SCHEMA_RANGE]
        assert bad.severity == dg.AssetCheckSeverity.ERROR
        assert bad.metadata["unexpected_count"].value == 1
        [sample] = bad.metadata["failing_rows"].value.records
        assert {k: sample.data[k] for k in ("device_id", "metric", "value", "range_max", "failed")} == {
            "device_id": "d1",
            "metric": "temperature",
            "value": 80.5,
            "range_max": 50.0,
            "failed": "value_at_most_max",
        }
        assert sample.data["ts"] == us_to_datetime(rows[4].ts).isoformat()
        assert checks[PARITY_CHECK_NAME].passed
        assert checks[PARITY_CHECK_NAME].metadata["lake_rows"].value == 48
        assert checks[FRESHNESS_CHECK_NAME].severity == dg.AssetCheckSeverity.WARN
        assert compactions(conn) == [("acme", D, 48, 48, True)]

        # The device type's next schema version allows the value: the same partition now passes.
        register_schema(  # replaces the schema outright (drops pressure and the types): forced
            conn,
            "acme",
            "thermo",
            {"properties": {"values": {"properties": {"temperature": {"maximum": 100}}}}},
            force=True,
        )
        passed = dg.materialize(
            [telemetry_lake, *telemetry_quality_checks, rollup_stub],
            partition_key=key,
            resources=resources_for(settings),
            instance=instance,
            raise_on_error=False,
        )

        assert passed.success
        assert {n: e.passed for n, e in evaluations(passed).items() if n != FRESHNESS_CHECK_NAME} == {
            **dict.fromkeys(CHECK_DESCRIPTIONS, True),
            PARITY_CHECK_NAME: True,
        }
        [rollup] = passed.asset_materializations_for_node("test__telemetry_rollup")
        assert rollup.partition == PARTITION


def test_the_telemetry_job_runs_the_checks_before_the_rollups(conn: psycopg.Connection, settings: Settings) -> None:
    """The Definitions snippet handed to orchestration: the existing job picks the checks up unchanged."""
    from orchestration.definitions import TELEMETRY_ASSETS, telemetry_lake_job

    create_tenant(conn, "acme")
    create_device(conn, "acme", "d1", device_type="thermo")
    create_device(conn, "acme", "d2")
    register_schema(conn, "acme", "thermo", THERMO)
    HotStoreWriter(conn).write(day_rows())
    defs = dg.Definitions(
        assets=TELEMETRY_ASSETS,
        asset_checks=telemetry_quality_checks,
        jobs=[telemetry_lake_job],
        sensors=[failed_quality_checks_sensor],
        resources=resources_for(settings),
    )
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("telemetry_lake_job")
    assert job.asset_layer.asset_graph.asset_check_keys >= {
        dg.AssetCheckKey(TELEMETRY_LAKE_KEY, n) for n in (*CHECK_DESCRIPTIONS, PARITY_CHECK_NAME, FRESHNESS_CHECK_NAME)
    }
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme"])
        downstream = [a.key for a in TELEMETRY_ASSETS if a.key != TELEMETRY_LAKE_KEY]

        result = job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False)

        assert result.success
        assert {n: (e.passed, e.partition) for n, e in evaluations(result).items() if n != FRESHNESS_CHECK_NAME} == {
            n: (True, PARTITION) for n in (*CHECK_DESCRIPTIONS, PARITY_CHECK_NAME)
        }
        assert compactions(conn) == [("acme", D, 48, 48, True)]
        assert {e.asset_key for e in result.get_asset_materialization_events()} == {TELEMETRY_LAKE_KEY, *downstream}

        # With a value above the schema's maximum the rollups of that partition are not written.
        with conn.transaction():
            conn.execute(
                "UPDATE telemetry SET value = 99 WHERE device_id = 'd1' AND metric = 'temperature' AND ts = %s", (DAY,)
            )
        blocked = job.execute_in_process(partition_key=PARTITION, instance=instance, raise_on_error=False)
        assert not blocked.success
        assert not evaluations(blocked)[VALUES_IN_SCHEMA_RANGE].passed
        assert {e.asset_key for e in blocked.get_asset_materialization_events()} == {TELEMETRY_LAKE_KEY}


# -- sensor -------------------------------------------------------------------------------------


class DamagingHotStore(HotStoreResource):
    """A hot store that, once the day is compacted, deletes d2 from the lake partition on every connect.

    Stands in for another writer damaging the partition between the compaction and its checks.
    """

    lake_uri: str

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        with super().connect() as conn:
            if conn.execute("SELECT count(*) FROM lake_compactions").fetchone() != (0,):
                DeltaTable(f"{self.lake_uri}/telemetry").delete("device_id = 'd2'")
            conn.commit()
            yield conn


def test_failed_parity_requests_one_recompaction_and_never_loops(
    conn: psycopg.Connection, settings: Settings, dagster_instance: dg.DagsterInstance
) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    HotStoreWriter(conn).write(day_rows())
    instance = dagster_instance
    instance.add_dynamic_partitions("tenants", ["acme"])
    assets = [telemetry_lake, *telemetry_quality_checks, rollup_stub]
    normal = resources_for(settings)
    assert settings.database_url
    damaging = {
        **normal,
        "hot_store": DamagingHotStore(database_url=settings.database_url, lake_uri=settings.lake_root),
    }

    def run(res: dict, tags: dict[str, str] | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            assets, partition_key=PARTITION, resources=res, instance=instance, tags=tags, raise_on_error=False
        )

    def tick(cursor: str | None) -> SensorExecutionData:
        return sensor_tick("failed_quality_checks_sensor", instance, cursor)

    first = run(damaging)
    assert not first.success
    parity = evaluations(first)[PARITY_CHECK_NAME]
    assert not parity.passed
    assert parity.metadata["lake_rows"].value == 24
    assert parity.metadata["recorded_rows"].value == 48
    sample = parity.metadata["failing_rows"].value.records
    assert len(sample) == 20
    assert {(r.data["side"], r.data["device_id"]) for r in sample} == {("missing_from_lake", "d2")}
    assert first.asset_materializations_for_node("test__telemetry_rollup") == []

    # One re-compaction of the partition, tagged with the run whose check failed.
    requested = tick(None)
    [request] = requested.run_requests or []
    assert request.partition_key == PARTITION
    assert request.tags[RECOMPACTION_TAG] == first.run_id
    assert request.run_key == f"recompact:{PARTITION}:{first.run_id}"
    assert requested.cursor and int(requested.cursor) > 0
    # Nothing new on the next tick.
    again = tick(requested.cursor)
    assert not again.run_requests
    assert again.cursor == requested.cursor

    # The requested run restores the partition from the hot store and passes.
    redo = run(normal, dict(request.tags))
    assert redo.success
    assert evaluations(redo)[PARITY_CHECK_NAME].passed
    assert compactions(conn) == [("acme", D, 48, 48, True)]
    assert not tick(again.cursor).run_requests

    # A re-compaction that fails again is not retried: a person has to look.
    second = run(damaging)
    assert not second.success
    after_second = tick(again.cursor)
    [retry] = after_second.run_requests or []
    failed_retry = run(damaging, dict(retry.tags))
    assert not failed_retry.success
    gave_up = tick(after_second.cursor)
    assert not gave_up.run_requests
    assert gave_up.skip_message == "1 new failed check(s), no re-compaction to request"

    # A failure already superseded by a passing run is left alone.
    assert not run(damaging).success
    assert run(normal).success
    assert not tick(gave_up.cursor).run_requests
