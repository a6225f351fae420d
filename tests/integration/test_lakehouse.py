"""Rollups, maintenance (optimize, vacuum, history) and retention, on real PostgreSQL and real Delta tables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow as pa
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData
from deltalake import DeltaTable, write_deltalake

from assets.rollups import telemetry_1h, telemetry_1m
from assets.telemetry import telemetry_lake, telemetry_partition_key
from lake.maintenance import (
    cluster_closed_days,
    optimize_partition,
    optimize_table,
    partition_file_counts,
    table_history,
    vacuum_table,
)
from lake.retention import apply_hot_retention, apply_lake_retention
from lake.rollups import ROLLUP_1H, ROLLUP_1M, ROLLUP_SCHEMA, rollup_readings, write_rollup
from lake.storage import LakeError, open_table, read_partition, table_uri
from lake.telemetry import TELEMETRY_SCHEMA, compact_day, ensure_table, read_telemetry
from orchestration.resources import resources_for
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import existing_partition_days
from sensormine.reading import Reading, datetime_to_us, readings_to_table
from sensormine.settings import Settings, reset_settings
from sensormine.tenancy.tenants import create_tenant
from tests.conftest import REPO
from tests.factories import DAY, make_tenant, readings, sensor_tick

pytestmark = pytest.mark.integration

D = DAY.date()
MINUTE_US = 60_000_000
ROLLUP_ORDER = ["device_id", "metric", "bucket"]
SORT = [("tenant_id", "ascending"), ("device_id", "ascending"), ("metric", "ascending"), ("ts", "ascending")]


def day_us(day: date) -> int:
    return datetime_to_us(DAY + timedelta(days=(day - D).days))


def spread(tenant_id: str, device: str, day: date, n: int = 300) -> list[Reading]:
    """n readings x 2 metrics every 17 s from the start of `day` (several per minute, a few hours)."""
    return readings(tenant_id, device, n, start_us=day_us(day), step_us=17_000_000)


def verify(conn: psycopg.Connection, tenant_id: str, day: date) -> None:
    """Record a passed row-count check for one compaction (what the parity asset check does)."""
    conn.execute(
        "UPDATE lake_compactions SET verified_rows = row_count, verified_at = now() WHERE tenant_id = %s AND day = %s",
        (tenant_id, day),
    )
    conn.commit()


# --- rollups ----------------------------------------------------------------------------------


def test_one_run_compacts_and_rolls_up_and_a_rerun_changes_nothing(
    conn: psycopg.Connection, lake_settings: Settings
) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = spread("acme", "d1", D) + spread("acme", "d2", D, 100)
    HotStoreWriter(conn).write(rows)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme"])
        key = telemetry_partition_key("acme", D)

        def run() -> dict[str, pa.Table]:
            result = dg.materialize(
                [telemetry_lake, telemetry_1m, telemetry_1h],
                partition_key=key,
                resources=resources_for(lake_settings),
                instance=instance,
            )
            assert result.success
            return {
                name: read_partition(lake_settings, name, ROLLUP_SCHEMA, "acme", D, ROLLUP_ORDER)
                for name in (ROLLUP_1M.name, ROLLUP_1H.name)
            }

        first = run()
        raw = readings_to_table(rows)
        assert first[ROLLUP_1M.name].equals(rollup_readings(raw, timedelta(minutes=1)))
        hourly = rollup_readings(raw, timedelta(hours=1))
        for col in ("device_id", "metric", "bucket", "count", "min", "max", "first", "last"):
            assert first[ROLLUP_1H.name][col].equals(hourly[col]), col
        assert sum(first[ROLLUP_1H.name]["count"].to_pylist()) == len(rows)
        versions = {n: open_table(lake_settings, n).version() for n in ("telemetry", *first)}  # type: ignore[union-attr]

        second = run()
        for name in first:
            assert second[name].equals(first[name]), name
        assert read_telemetry(lake_settings, ["acme"]).num_rows == len(rows)
        # Each run is one new version per table that replaced the partition, not an append.
        assert {n: open_table(lake_settings, n).version() for n in versions} == {n: v + 1 for n, v in versions.items()}  # type: ignore[union-attr]


def test_rollup_of_an_empty_day_empties_its_partition(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1"])
    HotStoreWriter(conn).write(spread("acme", "d1", D, 50))
    compact_day(conn, settings, "acme", D)
    assert write_rollup(settings, ROLLUP_1M, "acme", D).readings == 100
    conn.execute("DELETE FROM telemetry")
    conn.commit()
    compact_day(conn, settings, "acme", D)
    result = write_rollup(settings, ROLLUP_1M, "acme", D)
    assert (result.rows, result.readings) == (0, 0)
    assert read_partition(settings, ROLLUP_1M.name, ROLLUP_SCHEMA, "acme", D).num_rows == 0


# --- optimize, vacuum, history ----------------------------------------------------------------


def test_optimize_merges_a_multi_file_partition_and_keeps_its_rows(lake_settings: Settings) -> None:
    table = ensure_table(lake_settings)
    parts = [readings_to_table(readings("acme", f"d{i}", 200)) for i in range(4)]
    for part in parts:  # four appends: four small files in one partition
        write_deltalake(
            table,
            part.append_column("date", pa.array([D] * part.num_rows, pa.date32())).cast(TELEMETRY_SCHEMA),
            mode="append",
        )
    other = readings_to_table(readings("globex", "d1", 10))
    write_deltalake(
        table,
        other.append_column("date", pa.array([D] * other.num_rows, pa.date32())).cast(TELEMETRY_SCHEMA),
        mode="append",
    )
    before = read_telemetry(lake_settings, ["acme", "globex"])
    assert partition_file_counts(table)[("acme", D)] == 4

    result = optimize_partition(lake_settings, "telemetry", "acme", D)

    assert (result.files_before, result.files_after) == (4, 1)
    assert read_telemetry(lake_settings, ["acme", "globex"]).equals(before)
    # A single-file partition is left alone, and a second pass finds nothing to do.
    assert optimize_partition(lake_settings, "telemetry", "globex", D).table_version is None
    assert optimize_table(lake_settings, "telemetry") == []
    history = table_history(lake_settings, "telemetry", limit=1)
    assert history[0]["operation"] == "OPTIMIZE"
    assert history[0]["sensormine.operation"] == "optimize"


def test_vacuum_keeps_recent_versions_unless_forced(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1"])
    HotStoreWriter(conn).write(spread("acme", "d1", D, 100))
    compact_day(conn, settings, "acme", D)
    compact_day(conn, settings, "acme", D)  # the first version's file is now unreferenced
    data_files = lambda: sorted(p.name for p in Path(table_uri(settings, "telemetry")).rglob("*.parquet"))  # noqa: E731
    assert len(data_files()) == 2

    assert vacuum_table(settings, "telemetry") == []  # within the 7-day safety window
    with pytest.raises(Exception, match=r"(?i)retention"):
        vacuum_table(settings, "telemetry", retention_hours=0)
    assert len(vacuum_table(settings, "telemetry", retention_hours=0, dry_run=True, force=True)) == 1
    assert len(data_files()) == 2
    removed = vacuum_table(settings, "telemetry", retention_hours=0, force=True)
    assert len(removed) == 1 and len(data_files()) == 1
    assert read_telemetry(settings, ["acme"]).num_rows == 200
    # Both vacuum commits carry our commit metadata (sensormine lake history shows it).
    assert [h.get("sensormine.operation") for h in table_history(settings, "telemetry", limit=2)] == ["vacuum"] * 2
    ops = [h["operation"] for h in table_history(settings, "telemetry")]
    assert ops[:2] == ["VACUUM END", "VACUUM START"] and ops.count("WRITE") == 2
    with pytest.raises(LakeError, match="does not exist"):
        vacuum_table(settings, "no_such_table")


# --- crash safety -----------------------------------------------------------------------------

_KILLABLE_COMPACTION = """
import sys, time
from datetime import date
import pyarrow as pa
import lake.storage as storage
import lake.telemetry as t
from sensormine.clients.postgres import LAKE, connect
from sensormine.settings import Settings, reset_settings
real_write = storage.write_deltalake
def slow_write(table, data, **kwargs):
    # The real writer, fed slowly: the process is inside write_deltalake when it is killed.
    def batches():
        for i, batch in enumerate(data):
            if i == 3:
                print("writing", flush=True)
            if i >= 3:
                time.sleep(0.05)
            yield batch
    return real_write(table, pa.RecordBatchReader.from_batches(data.schema, batches()), **kwargs)
storage.write_deltalake = slow_write
t._BLOCK_BYTES = 64 << 10  # many small batches streaming from the COPY into the writer
settings = Settings(database_url=sys.argv[1], lake_uri=sys.argv[2])
with connect(settings, role=LAKE) as conn:
    t.compact_day(conn, settings, "acme", date.fromisoformat(sys.argv[3]))
print("finished", flush=True)
"""


def test_a_compaction_killed_mid_write_leaves_the_previous_version_and_a_retry_finishes(
    conn: psycopg.Connection, settings: Settings
) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    first = spread("acme", "d1", D, 500)
    HotStoreWriter(conn).write(first)
    compact_day(conn, settings, "acme", D)
    before = read_telemetry(settings, ["acme"])
    version = open_table(settings, "telemetry").version()  # type: ignore[union-attr]
    HotStoreWriter(conn).write(readings("acme", "d2", 20_000, start_us=day_us(D), step_us=1_000_000))

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_COMPACTION, settings.database_url or "", settings.lake_root, D.isoformat()],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"  # the Delta writer is consuming the stream
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    table = DeltaTable(table_uri(settings, "telemetry"))
    assert table.version() == version
    assert read_telemetry(settings, ["acme"]).equals(before)
    assert conn.execute("SELECT row_count FROM lake_compactions").fetchall() == [(len(first),)]

    result = compact_day(conn, settings, "acme", D)
    assert result.rows == len(first) + 40_000
    hot = conn.execute("SELECT count(*) FROM telemetry").fetchone()
    assert hot == (result.rows,)
    assert read_telemetry(settings, ["acme"]).num_rows == result.rows
    # Whatever the killed writer left behind is garbage no version references: vacuum removes it.
    vacuum_table(settings, "telemetry", retention_hours=0, force=True)
    assert read_telemetry(settings, ["acme"]).num_rows == result.rows


# --- retention --------------------------------------------------------------------------------


def test_hot_retention_drops_only_days_the_lake_holds_and_no_plan_keeps(
    conn: psycopg.Connection, settings: Settings
) -> None:
    create_tenant(conn, "free-co", plan="free")  # hot 7 days
    create_tenant(conn, "pro-co", plan="pro")  # hot 30 days
    today = D
    old, older, oldest, recent = (
        today - timedelta(days=10),
        today - timedelta(days=12),
        today - timedelta(days=40),
        today - timedelta(days=3),
    )
    writer = HotStoreWriter(conn)
    writer.write(
        spread("free-co", "d1", old, 20) + spread("free-co", "d1", older, 20) + spread("free-co", "d1", recent, 20)
    )
    writer.write(spread("free-co", "d1", oldest, 20) + spread("pro-co", "d1", oldest, 20))
    writer.write(spread("pro-co", "d1", older, 20))  # keeps `older` (pro keeps 30 days)
    for tenant_id, day in [("free-co", old), ("free-co", older), ("free-co", oldest), ("pro-co", oldest)]:
        compact_day(conn, settings, tenant_id, day)
    verify(conn, "free-co", old)
    verify(conn, "pro-co", oldest)
    # free-co's oldest day was compacted but not verified; a late row arrives for `old`... after verification.
    writer.write([Reading("free-co", "d1", "late", day_us(old) + 5, 1.0, 0, day_us(today))])

    plan = {d.day: d for d in apply_hot_retention(conn, today, dry_run=True)}
    assert plan[old].dropped is False and "1 rows arrived after the compaction" in plan[old].reason
    assert plan[older].dropped is False and "hot retention (30 days)" in plan[older].reason
    assert plan[oldest].dropped is False and "free-co: lake row-count check has not passed" in plan[oldest].reason
    assert recent not in plan or plan[recent].dropped is False

    compact_day(conn, settings, "free-co", old)
    verify(conn, "free-co", old)
    verify(conn, "free-co", oldest)
    decisions = {d.day: d for d in apply_hot_retention(conn, today)}
    assert decisions[old].dropped and decisions[old].rows == 41
    assert decisions[oldest].dropped and decisions[oldest].rows == 80
    assert not decisions[older].dropped and not decisions[recent].dropped
    days = existing_partition_days(conn)
    assert old not in days and oldest not in days and {older, recent} <= days
    # The dropped days are still served from the lake, row for row.
    assert read_telemetry(settings, ["free-co"], days=[old]).num_rows == 41


def test_lake_retention_follows_each_tenants_chosen_plan(conn: psycopg.Connection, lake_settings: Settings) -> None:
    create_tenant(conn, "free-co", plan="free")  # lake 90 days
    create_tenant(conn, "big-co", plan="enterprise")  # lake forever
    # big-co's invoice is unpaid past its grace period: the free plan's limits apply, but retention keeps
    # its data by the plan it chose (an unpaid invoice never deletes history).
    conn.execute(
        "INSERT INTO tenant_payment_status (tenant_id, status, past_due_since, grace_until) "
        "VALUES ('big-co', 'past_due', now() - interval '30 days', now() - interval '23 days')"
    )
    assert conn.execute("SELECT sensormine_effective_plan('big-co')").fetchone() == ("free",)
    today = D
    ancient, kept = today - timedelta(days=120), today - timedelta(days=60)
    writer = HotStoreWriter(conn)
    for tenant_id in ("free-co", "big-co"):
        for day in (ancient, kept):
            writer.write(spread(tenant_id, "d1", day, 20))
            compact_day(conn, lake_settings, tenant_id, day)
            write_rollup(lake_settings, ROLLUP_1M, tenant_id, day)

    results = apply_lake_retention(conn, lake_settings, today)

    assert {(r.tenant_id, r.table, r.partitions) for r in results} == {
        ("free-co", "telemetry", 1),
        ("free-co", "telemetry_1m", 1),
    }
    assert read_telemetry(lake_settings, ["free-co"], days=[ancient]).num_rows == 0
    assert read_telemetry(lake_settings, ["free-co"], days=[kept]).num_rows == 40
    assert read_telemetry(lake_settings, ["big-co"]).num_rows == 80
    assert read_partition(lake_settings, "telemetry_1m", ROLLUP_SCHEMA, "free-co", ancient).num_rows == 0
    assert conn.execute("SELECT tenant_id, day FROM lake_compactions ORDER BY 1, 2").fetchall() == [
        ("big-co", ancient),
        ("big-co", kept),
        ("free-co", kept),
    ]
    assert apply_lake_retention(conn, lake_settings, today) == []


# --- clustering and the housekeeping job ------------------------------------------------------


def interleaved(tenant_id: str, day: date, devices: int = 5, n: int = 200) -> list[Reading]:
    """Readings in arrival order: every device reports at each tick, so the heap mixes devices."""
    start = day_us(day)
    return [
        Reading(tenant_id, f"d{k}", "temp", start + i * 1_000_000, float(i * 10 + k), 0, start + i * 1_000_000)
        for i in range(n)
        for k in range(devices)
    ]


def partition_device_order(settings: Settings, tenant_id: str, day: date) -> list[str]:
    """device_id of every row of the partition's files, in physical order."""
    import pyarrow.parquet as pq

    table = open_table(settings, "telemetry")
    assert table is not None
    files = [f for f in table.file_uris() if f"tenant_id={tenant_id}/date={day}" in f]
    return [d for f in files for d in pq.read_table(f, columns=["device_id"])["device_id"].to_pylist()]


def test_closed_days_are_clustered_by_device_once(conn: psycopg.Connection, settings: Settings) -> None:
    create_tenant(conn, "acme")
    yesterday = D - timedelta(days=1)
    writer = HotStoreWriter(conn)
    for i in range(0, 1000, 100):  # ten commits in arrival order
        writer.write(interleaved("acme", yesterday)[i : i + 100])
    writer.write(interleaved("acme", D, n=10))
    compact_day(conn, settings, "acme", yesterday)
    compact_day(conn, settings, "acme", D)
    before = read_telemetry(settings, ["acme"])

    results = cluster_closed_days(conn, settings, today=D)

    assert [(r.tenant_id, r.day) for r in results] == [("acme", yesterday)]  # today is not closed
    order = partition_device_order(settings, "acme", yesterday)
    assert order == sorted(order) and len(order) == 1000
    assert read_telemetry(settings, ["acme"]).equals(before)
    assert cluster_closed_days(conn, settings, today=D) == []
    # A new compaction (a backfill) writes arrival order again, and the day is clustered again.
    compact_day(conn, settings, "acme", yesterday)
    assert [(r.tenant_id, r.day) for r in cluster_closed_days(conn, settings, today=D)] == [("acme", yesterday)]


def test_housekeeping_job_clusters_expires_and_vacuums(conn: psycopg.Connection, settings: Settings) -> None:
    create_tenant(conn, "acme")  # free plan: 7 hot days, 90 lake days
    old, ancient = D - timedelta(days=10), D - timedelta(days=100)
    HotStoreWriter(conn).write(interleaved("acme", old, n=20) + interleaved("acme", ancient, n=20))
    for day in (old, ancient):
        compact_day(conn, settings, "acme", day)
        write_rollup(settings, ROLLUP_1M, "acme", day)
        verify(conn, "acme", day)
    compact_day(conn, settings, "acme", old)  # leaves an unreferenced file for vacuum
    verify(conn, "acme", old)

    from orchestration.housekeeping import lake_housekeeping_job

    result = lake_housekeeping_job.execute_in_process(
        run_config={
            "ops": {
                name: {"config": {"today": D.isoformat(), "vacuum_retention_hours": 0}}
                for name in ("optimize_lake", "hot_retention", "lake_retention", "vacuum_lake")
            }
        },
        resources=resources_for(settings),
        raise_on_error=False,
    )
    # Vacuum below the 7-day minimum is refused unless forced: the job's default is the safe path.
    assert not result.success
    assert result.output_for_node("optimize_lake") == 2
    assert result.output_for_node("hot_retention") == 2  # both days: in the lake and verified
    assert result.output_for_node("lake_retention") == 2  # ancient day of telemetry and telemetry_1m
    assert existing_partition_days(conn).isdisjoint({old, ancient})
    assert read_telemetry(settings, ["acme"], days=[old]).num_rows == 100
    assert read_telemetry(settings, ["acme"], days=[ancient]).num_rows == 0

    ok = lake_housekeeping_job.execute_in_process(
        run_config={"ops": {"optimize_lake": {"config": {"today": D.isoformat()}}}},
        resources=resources_for(settings),
    )
    assert ok.success and ok.output_for_node("vacuum_lake") == 0  # nothing older than 7 days


# --- hot data sensor --------------------------------------------------------------------------


def test_hot_data_sensor_requests_a_day_after_the_threshold(
    conn: psycopg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sensors.hot_data import insert_counters, tenants_in_day

    monkeypatch.setenv("SENSORMINE_HOT_DATA_THRESHOLD_ROWS", "500")
    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", settings.database_migrate_url or "")
    reset_settings()
    create_tenant(conn, "acme")
    create_tenant(conn, "globex")
    writer = HotStoreWriter(conn)

    def write(rows: list[Reading]) -> None:
        writer.write(rows)
        conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's counters, visible now
        conn.commit()

    write(interleaved("acme", D, devices=2, n=50))  # 100 rows
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tenants", ["acme", "globex"])

        def tick(cursor: str | None) -> SensorExecutionData:
            return sensor_tick("hot_data_sensor", instance, cursor)

        first = tick(None)  # sets the baseline: nothing requested
        assert not first.run_requests
        write(interleaved("globex", D, devices=2, n=100))  # +200: under the threshold
        second = tick(first.cursor)
        assert not second.run_requests and second.cursor == first.cursor
        write([r._replace(metric="rpm") for r in interleaved("acme", D, devices=4, n=100)])  # +400: 600 in all
        third = tick(second.cursor)
        assert [r.partition_key for r in third.run_requests or []] == [f"{D}|acme", f"{D}|globex"]
        assert all(r.job_name in (None, "telemetry_lake_job") for r in third.run_requests or [])
        assert not (tick(third.cursor).run_requests)
    assert tenants_in_day(conn, D) == ["acme", "globex"]
    assert insert_counters(conn)[D] == 700
    reset_settings()
