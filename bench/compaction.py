"""Compaction benchmark: one tenant-day from the hot store into Delta, against the raw ceiling.

Run with `uv run python -m bench.compaction [--readings 5000000]` after `sensormine services up`
(it reads SENSORMINE_DATABASE_URL). It creates its own database and lake folder and removes them.

- compaction: `lake.telemetry.compact_day` (streaming COPY CSV -> Arrow -> Delta overwrite of the
  tenant-day, with its bookkeeping) into a fresh table each trial;
- raw ceiling: the same rows COPYed out by the same query under the same session settings as
  `compact_day` (`lake.telemetry.hot_day_batches`: `jit = off`, DateStyle, extra_float_digits; the
  server's parallel-query settings and Arrow's thread pool are the same for both and printed),
  parsed by Arrow's CSV reader into one in-memory table, and written with a plain
  `write_deltalake` (append, same partitioning, zstd as `lake.storage.replace_partition`) into a
  fresh table;
- clustering: `lake.maintenance.cluster_closed_days` (z-order by device_id of the closed day, under
  its compaction lock, marked in lake_compactions) on the table compaction wrote, against its
  ceiling: the raw table's partition read into memory, sorted by device_id in Arrow, written back
  with a plain `write_deltalake` overwrite of the partition (zstd).
Figures are medians over the trials (the machine is shared; the two sides alternate which runs
first); the ratio is compaction / raw. Nothing is cached: every phase reads the hot store or the lake.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from deltalake import DeltaTable, WriterProperties, write_deltalake
from psycopg import sql

from bench.common import checkpoint, rate, say, scratch_database
from lake.maintenance import ZORDER_COLUMNS, cluster_closed_days, partition_file_counts
from lake.storage import PARTITION_COLUMNS, partition_predicate
from lake.telemetry import CSV_COLUMN_TYPES, TELEMETRY_SCHEMA, compact_day, day_bounds
from sensormine.clients.postgres import ensure_partitions
from sensormine.reading import READING_SCHEMA
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant

DAY = date(2026, 3, 2)
TENANT = "bench"


def load_day(url: str, readings: int, devices: int, metrics: int) -> int:
    """Fill one tenant-day with `readings` rows (devices x metrics x evenly spaced timestamps) in SQL."""
    per_series = max(1, readings // (devices * metrics))
    step_us = 86_400_000_000 // per_series
    with psycopg.connect(url) as conn:
        create_tenant(conn, TENANT)
        with conn.transaction():
            ensure_partitions(conn, [DAY])
        conn.execute(
            """
            INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, quality, ingest_ts)
            SELECT %s, 'dev-' || lpad(d::text, 4, '0'), 'metric_' || m,
                   %s::timestamptz + make_interval(secs => i * %s::bigint / 1e6),
                   20 + 5 * sin(i / 100.0 + d) + m * 0.01 + random() * 0.1, (i %% 50 = 0)::int,
                   %s::timestamptz + make_interval(secs => i * %s::bigint / 1e6 + 1)
            FROM generate_series(1, %s) d, generate_series(1, %s) m, generate_series(0, %s - 1) i
            """,
            (TENANT, DAY.isoformat(), step_us, DAY.isoformat(), step_us, devices, metrics, per_series),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE telemetry")
        return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]  # type: ignore[index]


def compaction_trial(url: str, lake: Path) -> tuple[float, int]:
    """Seconds of one compact_day into a fresh table, and the rows it wrote."""
    settings = Settings(database_url=url, lake_uri=str(lake))
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        result = compact_day(conn, settings, TENANT, DAY)
        elapsed = time.perf_counter() - t0
    return elapsed, result.rows


def cluster_trial(url: str, lake: Path) -> tuple[float, int]:
    """Seconds of cluster_closed_days over the table compaction_trial wrote (the day is closed the next day)."""
    settings = Settings(database_url=url, lake_uri=str(lake))
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        done = cluster_closed_days(conn, settings, DAY + timedelta(days=1))
        elapsed = time.perf_counter() - t0
    if [(r.tenant_id, r.day) for r in done] != [(TENANT, DAY)] or done[0].table_version is None:
        raise RuntimeError(f"cluster_closed_days did not rewrite {TENANT}/{DAY}: {done}")
    return elapsed, DeltaTable(str(lake / "telemetry")).to_pyarrow_dataset().count_rows()


def raw_trial(url: str, lake: Path) -> tuple[float, int]:
    """Seconds of: COPY the day out (compact_day's query and settings), parse into one Arrow table, write_deltalake."""
    start, end = day_bounds(DAY)
    # The query of lake.telemetry.hot_day_batches (no ORDER BY), under the same session settings.
    query = sql.SQL(
        "COPY (SELECT tenant_id, device_id, metric, ts AT TIME ZONE 'UTC', value, quality, "
        "ingest_ts AT TIME ZONE 'UTC' FROM telemetry WHERE tenant_id = {} AND ts >= {} AND ts < {}) "
        "TO STDOUT (FORMAT CSV)"
    ).format(sql.Literal(TENANT), sql.Literal(start), sql.Literal(end))
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        buf = bytearray()
        with conn.transaction():
            conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
            conn.execute("SET LOCAL extra_float_digits = 1")
            conn.execute("SET LOCAL jit = off")  # as hot_day_batches
            with conn.cursor().copy(query) as copy:
                for chunk in copy:
                    buf += chunk
        table = pcsv.read_csv(
            pa.py_buffer(buf),
            read_options=pcsv.ReadOptions(column_names=READING_SCHEMA.names),
            convert_options=pcsv.ConvertOptions(column_types=CSV_COLUMN_TYPES),
        ).cast(READING_SCHEMA)
        table = table.append_column("date", pc.cast(table["ts"], pa.date32())).cast(TELEMETRY_SCHEMA)
        write_deltalake(
            str(lake / "telemetry"),
            table,
            mode="append",
            partition_by=PARTITION_COLUMNS,
            writer_properties=WriterProperties(compression="ZSTD"),  # as lake.storage.replace_partition
        )
        elapsed = time.perf_counter() - t0
    return elapsed, table.num_rows


def raw_cluster_trial(url: str, lake: Path) -> tuple[float, int]:
    """Seconds of: read the raw table's partition, sort by device_id in Arrow, overwrite the partition."""
    path = str(lake / "telemetry")
    t0 = time.perf_counter()
    table = DeltaTable(path)
    data = table.to_pyarrow_dataset(partitions=[("tenant_id", "=", TENANT), ("date", "=", DAY.isoformat())]).to_table()
    data = data.sort_by([(c, "ascending") for c in ZORDER_COLUMNS]).cast(TELEMETRY_SCHEMA)
    write_deltalake(
        table,
        data,
        mode="overwrite",
        predicate=partition_predicate(TENANT, DAY),
        writer_properties=WriterProperties(compression="ZSTD"),
    )
    elapsed = time.perf_counter() - t0
    return elapsed, DeltaTable(path).to_pyarrow_dataset().count_rows()


def settings_line(url: str) -> str:
    """The parallelism both sides share: the server's parallel-query settings and Arrow's thread pools."""
    with psycopg.connect(url) as conn:
        shown = {
            name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
            for name in ("max_parallel_workers_per_gather", "max_parallel_workers", "jit")
        }
    return (
        f"PostgreSQL (both sides): jit = off for the COPY (session default {shown['jit']}), "
        f"max_parallel_workers_per_gather = {shown['max_parallel_workers_per_gather']}, "
        f"max_parallel_workers = {shown['max_parallel_workers']}; Arrow CPU threads {pa.cpu_count()}, "
        f"I/O threads {pa.io_thread_count()}; delta-rs defaults on both sides"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the trials, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.compaction", description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=5_000_000, help="rows in the tenant-day")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--metrics", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    base = os.environ.get("SENSORMINE_DATABASE_URL")
    if not base:
        raise SystemExit("SENSORMINE_DATABASE_URL is not set: run `uv run sensormine services up` and source its env")
    work = Path(tempfile.mkdtemp(prefix="bench-compaction-"))
    times: dict[str, list[float]] = {"compaction": [], "raw": [], "cluster": [], "raw cluster": []}
    try:
        with scratch_database(base, "bench_compaction") as url:
            say(f"loading {args.readings:,} readings into one tenant-day ...")
            rows = load_day(url, args.readings, args.devices, args.metrics)
            say(f"loaded {rows:,} rows")
            shared = settings_line(url)
            sides = [
                ("compaction", compaction_trial, "cluster", cluster_trial),
                ("raw", raw_trial, "raw cluster", raw_cluster_trial),
            ]
            for trial in range(args.trials):
                for label, fn, cluster_label, cluster_fn in sides if trial % 2 == 0 else sides[::-1]:
                    lake = work / f"{label}-{trial}"
                    for phase, phase_fn in ((label, fn), (cluster_label, cluster_fn)):
                        checkpoint(url)
                        seconds, written = phase_fn(url, lake)
                        if written != rows:
                            raise RuntimeError(f"{phase} wrote {written} rows, expected {rows}")
                        if DeltaTable(str(lake / "telemetry")).to_pyarrow_dataset().count_rows() != rows:
                            raise RuntimeError(f"{phase}: the Delta table does not hold {rows} rows")
                        times[phase].append(seconds)
                        speed = rate(rows, seconds)
                        say(f"trial {trial + 1}/{args.trials} {phase}: {seconds:.2f} s, {speed:,.0f} rows/s")
                    files = partition_file_counts(DeltaTable(str(lake / "telemetry"))).get((TENANT, DAY), 0)
                    say(f"trial {trial + 1}/{args.trials} {label}: {files} file(s) in the partition after clustering")
                    shutil.rmtree(lake, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    both, raw_both = med["compaction"] + med["cluster"], med["raw"] + med["raw cluster"]
    width = 78
    print(
        f"Compaction benchmark, {os.cpu_count()} cores: one tenant-day of {rows:,} readings "
        f"({args.devices} devices x {args.metrics} metrics); median of {args.trials} trials, sides alternating\n"
        f"measured: hot store -> lake and lake -> lake, nothing cached\n{shared}\n\n"
        f"{'phase':<56}{'seconds':>9}{'rows/s':>13}\n{'-' * width}\n"
        f"{'compact_day (hot store -> Delta, streamed)':<56}{med['compaction']:>9.2f}"
        f"{rate(rows, med['compaction']):>13,.0f}\n"
        f"{'raw: COPY out -> Arrow -> plain write_deltalake':<56}{med['raw']:>9.2f}{rate(rows, med['raw']):>13,.0f}\n"
        f"{'cluster_closed_days (z-order by device_id)':<56}{med['cluster']:>9.2f}"
        f"{rate(rows, med['cluster']):>13,.0f}\n"
        f"{'raw: read partition -> Arrow sort -> overwrite':<56}{med['raw cluster']:>9.2f}"
        f"{rate(rows, med['raw cluster']):>13,.0f}\n"
        f"{'-' * width}\n"
        f"ratio compaction / raw: {rate(med['raw'], med['compaction']):.2f} (target >= 0.7)\n"
        f"ratio clustering / raw: {rate(med['raw cluster'], med['cluster']):.2f}\n"
        f"ratio compaction + clustering / raw + raw sort: {rate(raw_both, both):.2f} "
        f"({both:.2f} s against {raw_both:.2f} s for a closed day to reach its final layout)"
    )


if __name__ == "__main__":
    main()
