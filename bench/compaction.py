"""Compaction benchmark: one tenant-day from the hot store into Delta, against the raw ceiling.

Run with `uv run python -m bench.compaction [--readings 5000000]` after `sensormine services up`
(it reads SENSORMINE_DATABASE_URL). It creates its own database and lake folder and removes them.

- compaction: `lake.telemetry.compact_day` (streaming COPY CSV -> Arrow -> Delta overwrite of the
  tenant-day, with its bookkeeping) into a fresh table each trial;
- raw ceiling: the same rows COPYed out of the day partition with no ordering, parsed by Arrow's
  CSV reader into one in-memory table, and written with a plain `write_deltalake` (append, same
  partitioning) into a fresh table.
Figures are medians over the trials (the machine is shared); the ratio is compaction / raw.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from deltalake import DeltaTable, write_deltalake
from psycopg import sql

from bench.common import checkpoint, rate, say, scratch_database
from lake.storage import PARTITION_COLUMNS
from lake.telemetry import CSV_COLUMN_TYPES, TELEMETRY_SCHEMA, compact_day
from sensormine.clients.postgres import ensure_partitions, partition_name
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


def raw_trial(url: str, lake: Path) -> tuple[float, int]:
    """Seconds of: COPY the day out (no ORDER BY), parse it into one Arrow table, plain write_deltalake."""
    query = sql.SQL(
        "COPY (SELECT tenant_id, device_id, metric, ts AT TIME ZONE 'UTC', value, quality, "
        "ingest_ts AT TIME ZONE 'UTC' FROM {}) TO STDOUT (FORMAT CSV)"
    ).format(sql.Identifier(partition_name(DAY)))
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        conn.execute("SET DateStyle = 'ISO, YMD'")
        conn.execute("SET extra_float_digits = 1")
        buf = bytearray()
        with conn.cursor().copy(query) as copy:
            for chunk in copy:
                buf += chunk
        table = pcsv.read_csv(
            pa.py_buffer(buf),
            read_options=pcsv.ReadOptions(column_names=READING_SCHEMA.names),
            convert_options=pcsv.ConvertOptions(column_types=CSV_COLUMN_TYPES),
        ).cast(READING_SCHEMA)
        table = table.append_column("date", pc.cast(table["ts"], pa.date32())).cast(TELEMETRY_SCHEMA)
        write_deltalake(str(lake / "telemetry"), table, mode="append", partition_by=PARTITION_COLUMNS)
        elapsed = time.perf_counter() - t0
    return elapsed, table.num_rows


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
    times: dict[str, list[float]] = {"compaction": [], "raw": []}
    try:
        with scratch_database(base, "bench_compaction") as url:
            say(f"loading {args.readings:,} readings into one tenant-day ...")
            rows = load_day(url, args.readings, args.devices, args.metrics)
            say(f"loaded {rows:,} rows")
            for trial in range(args.trials):
                for label, fn in (("compaction", compaction_trial), ("raw", raw_trial)):
                    lake = work / f"{label}-{trial}"
                    checkpoint(url)
                    seconds, written = fn(url, lake)
                    if written != rows:
                        raise RuntimeError(f"{label} wrote {written} rows, expected {rows}")
                    if DeltaTable(str(lake / "telemetry")).to_pyarrow_dataset().count_rows() != rows:
                        raise RuntimeError(f"{label}: the Delta table does not hold {rows} rows")
                    times[label].append(seconds)
                    say(f"trial {trial + 1}/{args.trials} {label}: {seconds:.2f} s, {rate(rows, seconds):,.0f} rows/s")
                    shutil.rmtree(lake, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    comp, raw = statistics.median(times["compaction"]), statistics.median(times["raw"])
    print(
        f"Compaction benchmark, {os.cpu_count()} cores: one tenant-day of {rows:,} readings "
        f"({args.devices} devices x {args.metrics} metrics); median of {args.trials} trials\n\n"
        f"{'phase':<52}{'seconds':>9}{'rows/s':>13}\n{'-' * 74}\n"
        f"{'compact_day (hot store -> Delta, sorted, streamed)':<52}{comp:>9.2f}{rate(rows, comp):>13,.0f}\n"
        f"{'raw: COPY out -> Arrow -> plain write_deltalake':<52}{raw:>9.2f}{rate(rows, raw):>13,.0f}\n\n"
        f"ratio compaction / raw: {rate(raw, comp):.2f} (target >= 0.7)"
    )


if __name__ == "__main__":
    main()
