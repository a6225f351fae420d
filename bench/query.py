"""Query benchmark: a 30-day hourly aggregate of one device through `sensormine sql`, against bare DuckDB.

Run with `uv run python -m bench.query [--rows 50000000] [--layout compacted]`. The first run builds
a telemetry lake of at least `--rows` readings under `<state_dir>/bench/query/`; later runs with the
same shape and layout reuse it. `--layout` says how the lake is written:

- `compacted` (the default; needs SENSORMINE_DATABASE_URL): the way production writes it. Each day's
  rows go into the hot store of a scratch database in arrival order (every series at each instant),
  then `lake.telemetry.compact_day` writes each tenant-day (rows in the heap's order, as shipped);
  the day's hot partition is then dropped to keep the database small;
- `clustered`: the compacted lake after housekeeping: a copy of it with every tenant-day rewritten by
  `lake.maintenance.optimize_partition(..., min_files=1)` (the z-order by device_id that
  `cluster_closed_days` runs once per closed day; every day queried here is closed);
- `presorted`: synthetic files written directly, rows sorted by device_id, metric, ts (no service
  needed; the layout of the figures before issue 10, and of the unit test).

The headline is the whole `sensormine sql -c ... --format csv` process (the venv's `sensormine`
command: interpreter start, imports, catalog open, query, CSV) against a bare process that imports
duckdb and runs the same query with `read_parquet` over the same files, alternating,
`--process-runs` times each. What it measures: the lake's raw telemetry table (the cold path: no
rollup, no result cache; the OS page cache is warm after the warm-up runs).

Then, in process, the parts, interleaved round-robin after one warm-up each (the machine is
shared), in pairs with the same output so that each ratio compares like with like:

- Arrow result: bare DuckDB (`read_parquet([...the table's current files...], hive_partitioning
  = true)` in a plain connection) against the same SQL on the catalog `sensormine sql` opens
  (`lake.catalog.open_catalog`), unrestricted and restricted to the tenant (`--tenant`).
- CSV result: the bare query's Arrow stream through `lake.sqlshell.write_csv`, against
  `lake.sqlshell.run_script(..., fmt="csv")`, which is all that `sensormine sql -c ... --format
  csv` does after opening the catalog.
- for reference, the catalog's pyarrow-dataset reader (what an S3 lake uses) on the same files.

Medians are reported with the ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, WriterProperties, write_deltalake

from bench.common import say, scratch_database
from lake.catalog import open_catalog, quote_literal
from lake.maintenance import optimize_partition
from lake.sqlshell import run_script, write_csv
from lake.telemetry import TABLE_NAME, TELEMETRY_SCHEMA, compact_day
from sensormine.settings import Settings

LAYOUTS = ("compacted", "clustered", "presorted")

FIRST_DAY = date(2026, 1, 1)
METRIC_NAMES = ("temperature", "pressure", "vibration_rms", "motor_current", "power_kw", "flow_rate", "oil_temp")
MARKER = "bench-lake.json"
LAYOUT = 2  # bump whenever the generated data changes: cached lakes of another layout are rebuilt
BARE_ARROW = "bare DuckDB -> Arrow"
BARE_CSV = "bare DuckDB -> CSV"
PROC_CLI = "process: sensormine sql -c"
PROC_BARE = "process: python + duckdb"
TARGET = 1.3  # ratio to bare DuckDB
QUERY = """\
SELECT metric, date_trunc('hour', ts) AS hour,
       avg(value) AS avg_value, min(value) AS min_value, max(value) AS max_value, count(*) AS readings
FROM {source}
WHERE tenant_id = '{tenant}' AND device_id = '{device}'
  AND date >= DATE '{start}' AND date < DATE '{end}'
  AND ts >= TIMESTAMPTZ '{start} 00:00:00+00' AND ts < TIMESTAMPTZ '{end} 00:00:00+00'
GROUP BY ALL
ORDER BY ALL"""


@dataclass(frozen=True)
class Shape:
    """The synthetic lake: tenants x days x devices x metrics series, `samples` readings per series-day."""

    tenants: int
    days: int
    devices: int
    metrics: int
    samples: int

    @classmethod
    def for_rows(cls, rows: int, tenants: int, days: int, devices: int, metrics: int) -> Shape:
        """The smallest whole number of samples per series-day that reaches `rows`."""
        return cls(tenants, days, devices, metrics, max(1, math.ceil(rows / (tenants * days * devices * metrics))))

    @property
    def rows(self) -> int:
        """Readings in the whole lake."""
        return self.tenants * self.days * self.devices * self.metrics * self.samples

    @property
    def step_us(self) -> int:
        """Microseconds between two readings of one series."""
        return 86_400_000_000 // self.samples

    @property
    def name(self) -> str:
        """The cache folder's name."""
        return f"t{self.tenants}-d{self.days}-v{self.devices}-m{self.metrics}-s{self.samples}"

    def tenant_ids(self) -> list[str]:
        """Tenant ids t00, t01, ..."""
        return [f"t{i:02d}" for i in range(self.tenants)]

    def device_ids(self) -> list[str]:
        """Device ids dev-000, dev-001, ..."""
        return [f"dev-{i:03d}" for i in range(self.devices)]

    def metric_names(self) -> list[str]:
        """Metric names, sorted as compaction sorts rows (recycled with a suffix beyond the built-in list)."""
        return sorted(
            METRIC_NAMES[i % len(METRIC_NAMES)] + ("" if i < len(METRIC_NAMES) else f"_{i}")
            for i in range(self.metrics)
        )


def day_table(shape: Shape, tenant_index: int, day: date, rng: np.random.Generator) -> pa.Table:
    """One tenant-day in TELEMETRY_SCHEMA, sorted by device_id, metric, ts (as compaction writes it)."""
    series = shape.devices * shape.metrics
    n = series * shape.samples
    start_us = int(datetime.combine(day, datetime.min.time(), tzinfo=UTC).timestamp() * 1_000_000)
    ts_one = start_us + np.arange(shape.samples, dtype=np.int64) * shape.step_us
    ts = np.tile(ts_one, series)
    series_index = np.repeat(np.arange(series, dtype=np.int32), shape.samples)
    # A daily cycle per series plus noise: realistic enough to compress like sensor data.
    phase = 2 * np.pi * (ts - start_us) / 86_400_000_000
    value = 50 + 10 * tenant_index + (series_index % 17) + 5 * np.sin(phase) + rng.normal(0, 0.5, n)
    us = pa.timestamp("us", tz="UTC")
    devices = pa.DictionaryArray.from_arrays(pa.array(series_index // shape.metrics), pa.array(shape.device_ids()))
    metrics = pa.DictionaryArray.from_arrays(pa.array(series_index % shape.metrics), pa.array(shape.metric_names()))
    columns = [
        pa.repeat(pa.scalar(shape.tenant_ids()[tenant_index], pa.string()), n),
        devices.cast(pa.string()),
        metrics.cast(pa.string()),
        pa.array(ts, us),
        pa.array(value),
        pa.array((rng.random(n) < 0.01).astype(np.int16)),
        pa.array(ts + 1_500_000, us),
        pa.array(np.full(n, (day - date(1970, 1, 1)).days, np.int32), pa.int32()).cast(pa.date32()),
    ]
    return pa.Table.from_arrays(columns, schema=TELEMETRY_SCHEMA)


def marker_content(shape: Shape, layout: str = "presorted") -> dict[str, int | str]:
    """What the marker of a complete lake of this shape and layout holds."""
    content: dict[str, int | str] = {**asdict(shape), "rows": shape.rows, "layout": LAYOUT}
    if layout != "presorted":
        content["written_by"] = layout
    return content


def lake_dir(base: Path, shape: Shape, layout: str) -> Path:
    """The cache folder of a lake (presorted lakes keep the name they had before layouts existed)."""
    return base / (shape.name if layout == "presorted" else f"{shape.name}-{layout}")


DAY_SQL = """
INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, quality, ingest_ts)
SELECT 't' || lpad(t::text, 2, '0'), 'dev-' || lpad(d::text, 3, '0'), (%(metrics)s::text[])[m + 1],
       %(start)s::timestamptz + make_interval(secs => i * %(step)s::bigint / 1e6),
       50 + 10 * t + ((d * %(n_metrics)s + m) %% 17) + 5 * sin(2 * pi() * i * %(step)s::float8 / 86400e6)
          + (random() - 0.5),
       (random() < 0.01)::int,
       %(start)s::timestamptz + make_interval(secs => i * %(step)s::bigint / 1e6 + 1.5)
FROM generate_series(0, %(samples)s - 1) i, generate_series(0, %(tenants)s - 1) t,
     generate_series(0, %(devices)s - 1) d, generate_series(0, %(n_metrics)s - 1) m
ORDER BY i, t, d, m
"""


def build_compacted_lake(root: Path, shape: Shape, base_url: str) -> None:
    """Write the lake as production does: each day into the hot store in arrival order, then compact_day."""
    from sensormine.clients.postgres import ensure_partitions, partition_name
    from sensormine.tenancy.tenants import create_tenant

    if root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    written = 0
    with scratch_database(base_url, "bench_query") as url:
        settings = Settings(database_url=url, lake_uri=str(root))
        with psycopg.connect(url) as conn:
            for tenant in shape.tenant_ids():
                create_tenant(conn, tenant)
            conn.commit()
            for d in range(shape.days):
                day = FIRST_DAY + timedelta(days=d)
                with conn.transaction():
                    ensure_partitions(conn, [day])
                    conn.execute(
                        DAY_SQL,
                        {
                            "metrics": shape.metric_names(),
                            "n_metrics": shape.metrics,
                            "start": datetime.combine(day, datetime.min.time(), tzinfo=UTC),
                            "step": shape.step_us,
                            "samples": shape.samples,
                            "tenants": shape.tenants,
                            "devices": shape.devices,
                        },
                    )
                for tenant in shape.tenant_ids():
                    written += compact_day(conn, settings, tenant, day).rows
                with conn.transaction():  # the day is in the lake: keep the scratch database small
                    conn.execute(f"DROP TABLE {partition_name(day)}")
                if (d + 1) % 5 == 0 or d + 1 == shape.days:
                    elapsed = time.perf_counter() - started
                    say(f"lake: {d + 1}/{shape.days} days compacted, {written:,} rows, {written / elapsed:,.0f} rows/s")
    if written != shape.rows:
        raise RuntimeError(f"compaction wrote {written:,} rows, expected {shape.rows:,}")


def cluster_lake(source: Path, root: Path, shape: Shape) -> None:
    """A copy of a compacted lake with every tenant-day z-ordered by device_id, as housekeeping leaves closed days."""
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(source, root)
    (root / MARKER).unlink()
    settings = Settings(lake_uri=str(root))
    started = time.perf_counter()
    for d in range(shape.days):
        day = FIRST_DAY + timedelta(days=d)
        for tenant in shape.tenant_ids():
            optimize_partition(settings, TABLE_NAME, tenant, day, min_files=1)
        if (d + 1) % 5 == 0 or d + 1 == shape.days:
            say(f"lake: {d + 1}/{shape.days} days clustered in {time.perf_counter() - started:,.0f} s")


def build_lake(root: Path, shape: Shape) -> None:
    """Write the synthetic lake (one commit per day, all tenants), then the marker that makes it reusable."""
    if root.exists():
        shutil.rmtree(root)
    table_dir = root / "telemetry"
    rng = np.random.default_rng(20260101)
    started = time.perf_counter()
    written = 0
    for d in range(shape.days):
        day = FIRST_DAY + timedelta(days=d)
        # One chunk per tenant: delta-rs keeps each partition's rows in the order given.
        data = pa.concat_tables([day_table(shape, t, day, rng).combine_chunks() for t in range(shape.tenants)])
        write_deltalake(
            str(table_dir),
            data,
            mode="append",
            partition_by=["tenant_id", "date"],
            writer_properties=WriterProperties(compression="ZSTD"),  # as lake.storage.replace_partition
        )
        written += data.num_rows
        if (d + 1) % 5 == 0 or d + 1 == shape.days:
            elapsed = time.perf_counter() - started
            say(f"lake: {d + 1}/{shape.days} days written, {written:,} rows, {written / elapsed:,.0f} rows/s")
    (root / MARKER).write_text(json.dumps(marker_content(shape)))


def lake_root(base: Path, shape: Shape, rebuild: bool, layout: str = "presorted", db_url: str | None = None) -> Path:
    """The cached lake for this shape and layout, built when missing, incomplete or `rebuild` is asked."""
    root = lake_dir(base, shape, layout)
    marker = root / MARKER
    complete = marker.exists() and json.loads(marker.read_text()) == marker_content(shape, layout)
    if rebuild or not complete:
        say(f"building a {shape.rows:,}-row {layout} lake in {root} ...")
        if layout == "presorted":
            build_lake(root, shape)
            return root  # build_lake writes its marker
        if layout == "clustered":
            cluster_lake(lake_root(base, shape, rebuild, "compacted", db_url), root, shape)
        else:
            if not db_url:
                raise SystemExit("--layout compacted needs SENSORMINE_DATABASE_URL (compact_day reads the hot store)")
            build_compacted_lake(root, shape, db_url)
        marker.write_text(json.dumps(marker_content(shape, layout)))
    else:
        say(f"reusing the {shape.rows:,}-row {layout} lake in {root}")
    return root


def median_ms(samples: list[float]) -> float:
    """Median of seconds, in milliseconds."""
    return statistics.median(samples) * 1000


def interleaved(paths: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds per run of each path: one warm-up each, then `repeat` rounds, each path once per round."""
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(repeat):
        for name, fn in paths.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
        say(f"round {i + 1}/{repeat}: " + ", ".join(f"{n} {t[-1] * 1000:.0f} ms" for n, t in times.items()))
    return times


def same_result(a: pa.Table, b: pa.Table) -> bool:
    """Equal keys, counts, min and max; averages equal to 1e-9 (parallel sums may round differently)."""
    if a.num_rows != b.num_rows or a.schema.names != b.schema.names:
        return False
    for name in a.schema.names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if name == "avg_value":
            if any(not math.isclose(p, q, rel_tol=1e-9) for p, q in zip(x, y, strict=True)):
                return False
        elif x != y:
            return False
    return True


def run_process(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall-clock seconds and stdout of one process (which must succeed)."""
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{args[:4]} failed: {done.stderr.strip()}")
    return elapsed, done.stdout


def main(argv: list[str] | None = None) -> None:
    """Build or reuse the lake, time both paths, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.query", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000, help="readings in the lake (at least)")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--days", type=int, default=45, help="days in the lake; the query reads 30 of them")
    parser.add_argument("--devices", type=int, default=25, help="devices per tenant")
    parser.add_argument("--metrics", type=int, default=4, help="metrics per device")
    parser.add_argument("--repeat", type=int, default=21, help="timed rounds of the in-process comparison")
    parser.add_argument("--process-runs", type=int, default=5, help="timed whole-process runs of each side")
    parser.add_argument("--dir", type=Path, default=None, help="where lakes are cached (<state_dir>/bench/query)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the lake even when a cached one exists")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="compacted", help="how the lake is written (see the module docstring)"
    )
    args = parser.parse_args(argv)
    if args.days < 31:
        parser.error("--days must be at least 31: the query reads 30 days and skips the first one")

    shape = Shape.for_rows(args.rows, args.tenants, args.days, args.devices, args.metrics)
    base = args.dir or Settings().state_dir.resolve() / "bench" / "query"
    root = lake_root(base, shape, args.rebuild, args.layout, os.environ.get("SENSORMINE_DATABASE_URL"))
    settings = Settings(lake_uri=str(root), state_dir=base)

    tenant = shape.tenant_ids()[min(1, shape.tenants - 1)]
    device = shape.device_ids()[min(7, shape.devices - 1)]
    start = FIRST_DAY + timedelta(days=min(10, shape.days - 30))
    end = start + timedelta(days=30)
    params = {"tenant": tenant, "device": device, "start": start, "end": end}
    query = QUERY.format(source="telemetry", **params)
    files = DeltaTable(str(root / "telemetry")).file_uris()
    file_list = "[" + ", ".join(quote_literal(f) for f in files) + "]"
    bare_query = QUERY.format(source=f"read_parquet({file_list}, hive_partitioning = true)", **params)

    opened = []
    for _ in range(5):
        t0 = time.perf_counter()
        catalog = open_catalog(settings)
        opened.append(time.perf_counter() - t0)
        catalog.close()
    catalog = open_catalog(settings)
    restricted = open_catalog(settings, [tenant])
    via_pyarrow = open_catalog(settings, reader="pyarrow")
    bare = duckdb.connect()
    bare.execute("SET TimeZone = 'UTC'")  # as the catalog does: hour buckets in UTC

    def sink() -> io.TextIOWrapper:
        return io.TextIOWrapper(io.BytesIO(), encoding="utf-8")

    expected = bare.sql(bare_query).to_arrow_table()
    hours = 30 * 24 * shape.metrics
    readings = int(pc.sum(expected.column("readings")).as_py())
    if expected.num_rows != hours or readings != 30 * shape.metrics * shape.samples:
        raise RuntimeError(f"bare DuckDB returned {expected.num_rows} rows / {readings} readings: not the lake built")
    for name, session in (("catalog", catalog), ("catalog --tenant", restricted), ("catalog pyarrow", via_pyarrow)):
        if not same_result(session.sql(query), expected):
            raise RuntimeError(f"{name} and bare DuckDB disagree")
    say(f"results agree: {expected.num_rows} hourly rows over {readings:,} readings of {tenant}/{device}")

    # Pairs with the same output: Arrow (the query itself), and CSV written by the same writer
    # (what `sensormine sql -c ... --format csv` adds); each ratio is against bare DuckDB's.
    paths: dict[str, Callable[[], object]] = {
        BARE_ARROW: lambda: bare.sql(bare_query).to_arrow_table(),
        "catalog -> Arrow": lambda: catalog.sql(query),
        "catalog --tenant -> Arrow": lambda: restricted.sql(query),
        BARE_CSV: lambda: write_csv(bare.sql(bare_query).to_arrow_reader(), io.BytesIO()),
        "sensormine sql path -> CSV": lambda: run_script(catalog, query, fmt="csv", out=sink()),
        "sensormine sql --tenant -> CSV": lambda: run_script(restricted, query, fmt="csv", out=sink()),
    }
    times = interleaved(paths, args.repeat)
    say("pyarrow-dataset reader (reference) ...")
    times.update(
        interleaved({"catalog, pyarrow reader -> Arrow": lambda: via_pyarrow.sql(query)}, max(3, args.repeat // 3))
    )
    for session in (catalog, restricted, via_pyarrow):
        session.close()
    bare.close()

    # Whole processes: the real command against a plain Python + DuckDB script over the same files.
    env = {**os.environ, "SENSORMINE_LAKE_URI": str(root)}
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(bare_query)
        bare_sql_file = f.name
    bare_script = (
        "import sys, duckdb; c = duckdb.connect(); c.execute(\"SET TimeZone = 'UTC'\"); "
        "c.sql(open(sys.argv[1]).read()).write_csv('/dev/stdout')"
    )
    # The command a user runs: the venv's `sensormine` script (python -m cli when it is not installed).
    script = Path(sys.executable).with_name("sensormine")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cli"]
    cli_args = [*command, "sql", "-c", query, "--format", "csv"]
    bare_args = [sys.executable, "-c", bare_script, bare_sql_file]
    process: dict[str, list[float]] = {PROC_CLI: [], PROC_BARE: []}
    if args.process_runs:
        run_process(cli_args, env)  # warm-up
        run_process(bare_args, env)
    for i in range(args.process_runs):
        seconds, out = run_process(cli_args, env)
        if len(out.splitlines()) != hours + 1:
            raise RuntimeError(f"sensormine sql printed {len(out.splitlines())} lines")
        process[PROC_CLI].append(seconds)
        process[PROC_BARE].append(run_process(bare_args, env)[0])
        say(f"process run {i + 1}/{args.process_runs}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in process.items()))
    os.unlink(bare_sql_file)

    # The live files only: clustering leaves the files it replaced until a vacuum.
    size = sum(DeltaTable(str(root / "telemetry")).get_add_actions(flatten=True).column("size_bytes").to_pylist())
    with duckdb.connect() as meta:
        row = meta.execute(
            f"SELECT count(DISTINCT (file_name, row_group_id)) FROM parquet_metadata({file_list})"
        ).fetchone()
    groups = row[0] if row else 0
    width = 68
    lines = [
        f"Query benchmark, {os.cpu_count()} cores, DuckDB {duckdb.__version__}: {shape.rows:,}-row lake "
        f"({shape.tenants} tenants x {shape.days} days x {shape.devices} devices x {shape.metrics} metrics, "
        f"{len(files)} files, {groups} row groups, {size / 2**20:,.0f} MiB), layout: {args.layout} "
        f"({LAYOUT_NOTES[args.layout]})",
        f"query: hourly avg/min/max/count per metric of {tenant}/{device}, {start} to {end} "
        f"({readings:,} readings -> {hours:,} rows)",
        "measured: the lake's raw telemetry table, the cold path (no rollup, no result cache; OS page cache warm)",
        "",
    ]
    if args.process_runs:
        cli_s, bare_s = statistics.median(process[PROC_CLI]), statistics.median(process[PROC_BARE])
        verdict = "met" if cli_s / bare_s <= TARGET else "NOT met"
        lines += [
            f"whole processes, median of {args.process_runs} alternating runs (`{' '.join(command)} sql -c ...`, "
            "catalog open included, against python -c 'import duckdb; ...' over the same files):",
            f"{'process':<38}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'ratio':>8}",
            "-" * width,
        ]
        for name, samples in process.items():
            med, lo, hi = (1000 * statistics.median(samples), 1000 * min(samples), 1000 * max(samples))
            lines.append(f"{name:<38}{med:>10.0f}{lo:>9.0f}{hi:>9.0f}{med / 1000 / bare_s:>8.2f}")
        lines += [f"headline: whole process ratio {cli_s / bare_s:.2f} (target <= {TARGET}): {verdict}", ""]
    lines += [
        f"in process, medians of {args.repeat} interleaved rounds (the parts):",
        f"{'path':<38}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'ratio':>8}",
        "-" * width,
    ]
    for name, samples in times.items():
        ms = median_ms(samples)
        baseline = median_ms(times[BARE_CSV if name.endswith("CSV") else BARE_ARROW])
        lines.append(
            f"{name:<38}{ms:>10.1f}{min(samples) * 1000:>9.1f}{max(samples) * 1000:>9.1f}{ms / baseline:>8.2f}"
        )
    lines.append(f"{'open_catalog (once per session)':<38}{median_ms(opened):>10.1f}")
    print("\n".join(lines), flush=True)


LAYOUT_NOTES = {
    "compacted": "written by compact_day from the hot store, rows in arrival order",
    "clustered": "compacted, then z-ordered by device_id per tenant-day as housekeeping does",
    "presorted": "synthetic, rows sorted by device_id, metric, ts: not how production writes it",
}


if __name__ == "__main__":
    main()
