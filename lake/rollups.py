"""Rollup tables `telemetry_1m` and `telemetry_1h`: per device x metric x time bucket statistics.

Each bucket row holds count, min, max, sum, avg, first and last (by timestamp) of the readings in
[bucket, bucket + width). `sum` is kept next to `avg` so that coarser buckets (and the query
planner) can combine rows exactly: avg over several buckets = sum(sum) / sum(count).
Both tables are partitioned like telemetry (tenant_id, date) and written one tenant-day at a
time by replacing the partition, so re-running a day is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from lake.storage import ensure_table, read_partition, replace_partition
from lake.telemetry import read_telemetry
from sensormine.settings import Settings

KEY_COLUMNS = ["tenant_id", "device_id", "metric"]
ROLLUP_SCHEMA = pa.schema(
    [
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("bucket", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("min", pa.float64(), nullable=False),
        pa.field("max", pa.float64(), nullable=False),
        pa.field("sum", pa.float64(), nullable=False),
        pa.field("avg", pa.float64(), nullable=False),
        pa.field("first", pa.float64(), nullable=False),
        pa.field("last", pa.float64(), nullable=False),
        pa.field("date", pa.date32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class Rollup:
    """One rollup table: its name, bucket width, and the table it is computed from."""

    name: str
    width: timedelta
    source: str  # "telemetry" (raw readings) or the name of a finer rollup


ROLLUP_1M = Rollup("telemetry_1m", timedelta(minutes=1), "telemetry")
ROLLUP_1H = Rollup("telemetry_1h", timedelta(hours=1), ROLLUP_1M.name)
ROLLUPS = {r.name: r for r in (ROLLUP_1M, ROLLUP_1H)}


def _bucket(ts: pa.ChunkedArray, width: timedelta) -> pa.ChunkedArray:
    seconds = int(width.total_seconds())
    if seconds <= 0 or width != timedelta(seconds=seconds):
        raise ValueError(f"bucket width must be a whole number of seconds, not {width}")
    return pc.floor_temporal(ts, multiple=seconds, unit="second")


def _aggregate(table: pa.Table, specs: list[tuple[str, str, str]]) -> pa.Table:
    """Group `table` (sorted by key and time) by key and bucket, single-threaded and in input order.

    Ordered and single-threaded on purpose: "first"/"last" follow the input's time order, and
    every sum adds its values in one fixed order, so re-running a day gives bit-identical rows.
    """
    grouped = table.group_by([*KEY_COLUMNS, "bucket"], use_threads=False).aggregate(
        [(column, func) for column, func, _ in specs]
    )
    # Output columns are named "<column>_<function>"; keys may come first or last across versions.
    names = {f"{column}_{func}": name for column, func, name in specs}
    grouped = grouped.rename_columns([names.get(n, n) for n in grouped.schema.names])
    count = grouped["count"].cast(pa.int64())
    out = grouped.set_column(grouped.schema.get_field_index("count"), "count", count)
    out = out.append_column("avg", pc.divide(out["sum"], pc.cast(out["count"], pa.float64())))
    out = out.append_column("date", pc.cast(out["bucket"], pa.date32()))
    out = out.select(ROLLUP_SCHEMA.names).cast(ROLLUP_SCHEMA)
    # One chunk: delta-rs keeps a single batch's row order, but may interleave several batches.
    return out.sort_by([(c, "ascending") for c in [*KEY_COLUMNS, "bucket"]]).combine_chunks()


def rollup_readings(readings: pa.Table, width: timedelta) -> pa.Table:
    """Bucket statistics of raw readings (READING_SCHEMA columns), in ROLLUP_SCHEMA, sorted by key and bucket."""
    if readings.num_rows == 0:
        return ROLLUP_SCHEMA.empty_table()
    table = readings.select([*KEY_COLUMNS, "ts", "value"]).sort_by([(c, "ascending") for c in [*KEY_COLUMNS, "ts"]])
    table = table.append_column("bucket", _bucket(table["ts"], width))
    specs = [
        ("value", "count", "count"),
        ("value", "min", "min"),
        ("value", "max", "max"),
        ("value", "sum", "sum"),
        ("value", "first", "first"),
        ("value", "last", "last"),
    ]
    return _aggregate(table, specs)


def rollup_rollups(rollups: pa.Table, width: timedelta) -> pa.Table:
    """Coarser buckets from finer rollup rows (ROLLUP_SCHEMA): exact for count, min, max, first, last."""
    if rollups.num_rows == 0:
        return ROLLUP_SCHEMA.empty_table()
    table = rollups.sort_by([(c, "ascending") for c in [*KEY_COLUMNS, "bucket"]]).rename_columns(
        ["fine" if n == "bucket" else n for n in rollups.schema.names]
    )
    table = table.append_column("bucket", _bucket(table["fine"], width))
    specs = [
        ("count", "sum", "count"),
        ("min", "min", "min"),
        ("max", "max", "max"),
        ("sum", "sum", "sum"),
        ("first", "first", "first"),
        ("last", "last", "last"),
    ]
    return _aggregate(table, specs)


def compute_rollup(settings: Settings, rollup: Rollup, tenant_id: str, day: date) -> pa.Table:
    """The rollup rows of one tenant-day, computed from the lake's copy of its source table."""
    if rollup.source == "telemetry":
        return rollup_readings(read_telemetry(settings, [tenant_id], days=[day]), rollup.width)
    source = read_partition(settings, rollup.source, ROLLUP_SCHEMA, tenant_id, day, [*KEY_COLUMNS, "bucket"])
    return rollup_rollups(source, rollup.width)


@dataclass(frozen=True)
class RollupResult:
    """What one `write_rollup` committed."""

    rows: int
    readings: int
    table_version: int


def write_rollup(settings: Settings, rollup: Rollup, tenant_id: str, day: date) -> RollupResult:
    """Recompute one tenant-day of `rollup` from its source and replace that partition."""
    rows = compute_rollup(settings, rollup, tenant_id, day)
    table = ensure_table(
        settings,
        rollup.name,
        ROLLUP_SCHEMA,
        f"Per device x metric statistics in {rollup.width} buckets; one partition per tenant and UTC day.",
    )
    version = replace_partition(table, rows, tenant_id, day, f"rollup:{rollup.name}")
    readings = int(pc.sum(rows["count"]).as_py() or 0)
    return RollupResult(rows=rows.num_rows, readings=readings, table_version=version)
