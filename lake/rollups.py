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

import polars as pl
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

    @property
    def every(self) -> str:
        """The bucket width in polars duration syntax."""
        return f"{int(self.width.total_seconds())}s"


ROLLUP_1M = Rollup("telemetry_1m", timedelta(minutes=1), "telemetry")
ROLLUP_1H = Rollup("telemetry_1h", timedelta(hours=1), ROLLUP_1M.name)
ROLLUPS = {r.name: r for r in (ROLLUP_1M, ROLLUP_1H)}


def _finish(frame: pl.LazyFrame) -> pa.Table:
    out = (
        frame.with_columns(avg=pl.col("sum") / pl.col("count"), date=pl.col("bucket").dt.date())
        .select(ROLLUP_SCHEMA.names)
        .sort([*KEY_COLUMNS, "bucket"])
        .collect()
    )
    return out.to_arrow().cast(ROLLUP_SCHEMA)


def rollup_readings(readings: pa.Table, width: timedelta) -> pa.Table:
    """Bucket statistics of raw readings (READING_SCHEMA columns), in ROLLUP_SCHEMA, sorted by key and bucket."""
    if readings.num_rows == 0:
        return ROLLUP_SCHEMA.empty_table()
    value = pl.col("value")
    frame = (
        pl.from_arrow(readings.select([*KEY_COLUMNS, "ts", "value"]))  # type: ignore[union-attr]
        .lazy()
        .with_columns(bucket=pl.col("ts").dt.truncate(f"{int(width.total_seconds())}s"))
        .group_by([*KEY_COLUMNS, "bucket"])
        .agg(
            count=pl.len().cast(pl.Int64),
            min=value.min(),
            max=value.max(),
            sum=value.sum(),
            first=value.sort_by("ts").first(),
            last=value.sort_by("ts").last(),
        )
    )
    return _finish(frame)


def rollup_rollups(rollups: pa.Table, width: timedelta) -> pa.Table:
    """Coarser buckets from finer rollup rows (ROLLUP_SCHEMA): exact for count, min, max, sum, first, last."""
    if rollups.num_rows == 0:
        return ROLLUP_SCHEMA.empty_table()
    frame = (
        pl.from_arrow(rollups)  # type: ignore[union-attr]
        .lazy()
        .rename({"bucket": "fine"})
        .with_columns(bucket=pl.col("fine").dt.truncate(f"{int(width.total_seconds())}s"))
        .group_by([*KEY_COLUMNS, "bucket"])
        .agg(
            count=pl.col("count").sum(),
            min=pl.col("min").min(),
            max=pl.col("max").max(),
            sum=pl.col("sum").sum(),
            first=pl.col("first").sort_by("fine").first(),
            last=pl.col("last").sort_by("fine").last(),
        )
    )
    return _finish(frame)


def compute_rollup(settings: Settings, rollup: Rollup, tenant_id: str, day: date) -> pa.Table:
    """The rollup rows of one tenant-day, computed from the lake's copy of its source table."""
    if rollup.source == "telemetry":
        return rollup_readings(read_telemetry(settings, [tenant_id], days=[day]), rollup.width)
    source = read_partition(settings, rollup.source, ROLLUP_SCHEMA, tenant_id, day)
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
