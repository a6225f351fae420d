"""The lake's telemetry table: compaction of hot-store tenant-days into Delta, and filtered reads.

Layout: `{lake_root}/telemetry`, partitioned by `tenant_id` and `date` (UTC day of `ts`); rows
are written in arrival order and clustered by device_id (z-order) once the day is closed. One
tenant-day is only ever written by `compact_day`, which replaces that partition as a whole, so
re-running it is idempotent.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as ds
from deltalake import DeltaTable
from psycopg import sql

from lake.storage import (
    check_tenant_id,
    open_table,
    replace_partition,
)
from lake.storage import (
    ensure_table as ensure_lake_table,
)
from sensormine.reading import READING_SCHEMA
from sensormine.settings import Settings

TABLE_NAME = "telemetry"
SORT_COLUMNS = ["device_id", "metric", "ts"]
TELEMETRY_SCHEMA = READING_SCHEMA.append(pa.field("date", pa.date32(), nullable=False))

# Per tenant-day advisory lock namespace: two compactions of the same partition would race on
# the Delta commit and on lake_compactions; different tenant-days still run in parallel.
_COMPACTION_LOCK = 7_351_101
# CSV bytes parsed per Arrow batch: bounds memory for multi-million-row days (~400 k rows each).
_BLOCK_BYTES = 32 << 20
# Timestamps leave PostgreSQL as naive UTC text, which Arrow parses natively and which does not
# depend on the session's TimeZone setting.
CSV_COLUMN_TYPES: dict[str, pa.DataType] = {
    f.name: (pa.timestamp("us") if pa.types.is_timestamp(f.type) else f.type) for f in READING_SCHEMA
}


@dataclass(frozen=True)
class CompactionResult:
    """What one `compact_day` wrote: row count, the Delta version it committed, max ingest_ts."""

    rows: int
    table_version: int
    hot_watermark: datetime | None


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day as aware datetimes."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def _as_utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def pruning_filters(
    tenant_ids: Sequence[str],
    start: datetime | None = None,
    end: datetime | None = None,
    days: Iterable[date] | None = None,
) -> list[tuple[str, str, Any]]:
    """delta-rs tuple filters on the partition columns, selecting the files a read must open."""
    filters: list[tuple[str, str, Any]] = [("tenant_id", "in", sorted(set(tenant_ids)))]
    if start is not None:
        filters.append(("date", ">=", _as_utc(start).date()))
    if end is not None:
        # `end` is exclusive: a read ending at midnight does not need the next day's files.
        filters.append(("date", "<=", (_as_utc(end) - timedelta(microseconds=1)).date()))
    if days is not None:
        filters.append(("date", "in", sorted(set(days))))
    return filters


def _strings(values: Iterable[str]) -> pa.Array:
    # Typed even when empty: an untyped empty list would be a null array that cannot match strings.
    return pa.array(sorted(set(values)), type=pa.string())


def row_filter(
    tenant_ids: Sequence[str],
    device_ids: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    days: Iterable[date] | None = None,
) -> pc.Expression:
    """The exact row predicate of a read (ts in [start, end)), for the Arrow dataset scanner."""
    expr = pc.field("tenant_id").isin(_strings(tenant_ids))
    if device_ids is not None:
        expr &= pc.field("device_id").isin(_strings(device_ids))
    if metrics is not None:
        expr &= pc.field("metric").isin(_strings(metrics))
    ts_type = pa.timestamp("us", tz="UTC")
    if start is not None:
        expr &= pc.field("ts") >= pa.scalar(_as_utc(start), type=ts_type)
    if end is not None:
        expr &= pc.field("ts") < pa.scalar(_as_utc(end), type=ts_type)
    if days is not None:
        expr &= pc.field("date").isin(pa.array(sorted(set(days)), type=pa.date32()))
    return expr


def _csv_batches(block: bytes | bytearray) -> list[pa.RecordBatch]:
    """Parse one block of COPY CSV rows into batches in TELEMETRY_SCHEMA."""
    table = pcsv.read_csv(
        pa.py_buffer(block),
        read_options=pcsv.ReadOptions(column_names=READING_SCHEMA.names),
        # PostgreSQL only quotes values that need it; without a quote in the block no value can
        # hold a newline, and Arrow may split the block across threads at any newline.
        parse_options=pcsv.ParseOptions(newlines_in_values=b'"' in block),
        # Every column is NOT NULL: no text may turn into a null (Arrow's defaults map "NaN" to one).
        convert_options=pcsv.ConvertOptions(column_types=CSV_COLUMN_TYPES, null_values=[], strings_can_be_null=False),
    )
    table = table.cast(READING_SCHEMA)
    # Derived from ts rather than set to the requested day, so a row outside the day would be
    # refused by the overwrite predicate instead of being filed under the wrong partition.
    table = table.append_column(TELEMETRY_SCHEMA.field("date"), pc.cast(table["ts"], pa.date32()))
    return table.combine_chunks().to_batches()


def hot_day_batches(conn: psycopg.Connection, tenant_id: str, day: date) -> Generator[pa.RecordBatch, None, None]:
    """Stream one tenant-day from the hot store as Arrow batches, in the heap's order (unsorted).

    COPY ... TO STDOUT (FORMAT CSV) parsed by Arrow's C++ reader: no Python object per row
    beyond the bytes message libpq hands over. No ORDER BY: a sequential scan of the day
    partition is about twice as fast as walking the primary key, whose order the heap (written
    in arrival order) does not follow, and delta-rs would interleave the batches anyway. Rows are
    clustered by device later, when housekeeping z-orders the closed day (lake.maintenance).
    Memory stays bounded by `_BLOCK_BYTES` whatever the size of the day. Consume it inside a
    transaction (it sets transaction-local settings).
    """
    start, end = day_bounds(day)
    query = sql.SQL(
        "COPY (SELECT tenant_id, device_id, metric, ts AT TIME ZONE 'UTC', value, quality, "
        "ingest_ts AT TIME ZONE 'UTC' FROM telemetry WHERE tenant_id = {} AND ts >= {} AND ts < {}) "
        "TO STDOUT (FORMAT CSV)"
    ).format(sql.Literal(tenant_id), sql.Literal(start), sql.Literal(end))
    # The text the parser expects, whatever the server's defaults: ISO dates, and the shortest
    # exact float text (the default since PostgreSQL 12) so the lake loses no precision.
    conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
    conn.execute("SET LOCAL extra_float_digits = 1")
    # A one-pass scan gains nothing from JIT compilation, which costs a few hundred ms.
    conn.execute("SET LOCAL jit = off")
    block = bytearray()
    with conn.cursor().copy(query) as copy:
        # PostgreSQL sends one COPY message per row, so a block always ends on a row boundary.
        for chunk in copy:
            block += chunk
            if len(block) >= _BLOCK_BYTES:
                yield from _csv_batches(block)
                block = bytearray()
    if block:
        yield from _csv_batches(block)


class _Tally:
    """Counts rows and tracks max(ingest_ts) of the batches flowing into the Delta writer."""

    def __init__(self) -> None:
        self.rows = 0
        self.max_ingest_us: int | None = None

    def watch(self, batches: Iterable[pa.RecordBatch]) -> Generator[pa.RecordBatch, None, None]:
        for batch in batches:
            if batch.num_rows:
                self.rows += batch.num_rows
                top = pc.max(batch.column("ingest_ts").cast(pa.int64())).as_py()
                self.max_ingest_us = top if self.max_ingest_us is None else max(self.max_ingest_us, top)
            yield batch

    @property
    def watermark(self) -> datetime | None:
        if self.max_ingest_us is None:
            return None
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=self.max_ingest_us)


def ensure_table(settings: Settings) -> DeltaTable:
    """The telemetry Delta table, created empty (schema + partitioning) if it does not exist yet."""
    return ensure_lake_table(
        settings, TABLE_NAME, TELEMETRY_SCHEMA, "Sensor readings, long format; one partition per tenant and UTC day."
    )


def lock_partition(conn: psycopg.Connection, tenant_id: str, day: date, shared: bool = False) -> None:
    """Take the tenant-day's advisory lock until the end of the caller's transaction.

    compact_day takes it exclusively; readers that must see a partition and its lake_compactions
    record agree (checks) take it shared; housekeeping takes it exclusively while rewriting.
    """
    fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.execute(
        sql.SQL("SELECT {}(%s, hashtext(%s))").format(sql.Identifier(fn)),
        (_COMPACTION_LOCK, f"{check_tenant_id(tenant_id)}/{day.isoformat()}"),
    )


def compact_day(conn: psycopg.Connection, settings: Settings, tenant_id: str, day: date) -> CompactionResult:
    """Replace the lake's tenant-day partition with the hot store's rows, then record it in lake_compactions.

    Idempotent: the Delta overwrite is limited to the partition's predicate, so running it again
    rewrites the same rows (a new table version, never duplicates), and an empty day leaves the
    partition empty. Runs in its own transaction when `conn` is idle.
    """
    check_tenant_id(tenant_id)
    with conn.transaction():
        lock_partition(conn, tenant_id, day)
        # Loaded under the lock, so the snapshot includes any earlier compaction of this tenant-day.
        table = ensure_table(settings)
        # Whatever this snapshot sees, the COPY (whose snapshot comes later) sees too; the query
        # planner reads a compacted day's other rows from the hot store as well (docs/decisions.md).
        snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
        tally = _Tally()
        source = hot_day_batches(conn, tenant_id, day)
        batches = tally.watch(source)
        try:
            reader = pa.RecordBatchReader.from_batches(TELEMETRY_SCHEMA, batches)
            version = replace_partition(table, reader, tenant_id, day, "compact_day")
        finally:
            # Ends the COPY if the writer stopped early, before the transaction rolls back.
            batches.close()
            source.close()
        watermark = tally.watermark
        conn.execute(
            "INSERT INTO lake_compactions (tenant_id, day, row_count, table_version, hot_watermark, hot_snapshot) "
            "VALUES (%s, %s, %s, %s, %s, %s::pg_snapshot) ON CONFLICT (tenant_id, day) DO UPDATE SET "
            "row_count = excluded.row_count, table_version = excluded.table_version, "
            "hot_watermark = excluded.hot_watermark, hot_snapshot = excluded.hot_snapshot, "
            "compacted_at = now(), clustered_at = NULL",
            (tenant_id, day, tally.rows, version, watermark, snapshot),
        )
        # The writes this snapshot sees are in the lake now; the log rows left mark possible late rows
        # (written by transactions the snapshot does not see), for readers (docs/query.md "Late rows").
        conn.execute(
            "DELETE FROM hot_write_log WHERE tenant_id = %s AND day = %s "
            "AND pg_visible_in_snapshot(txid, %s::pg_snapshot)",
            (tenant_id, day, snapshot),
        )
    return CompactionResult(rows=tally.rows, table_version=version, hot_watermark=watermark)


def telemetry_dataset(
    settings: Settings,
    tenant_ids: Sequence[str],
    start: datetime | None = None,
    end: datetime | None = None,
    days: Iterable[date] | None = None,
) -> ds.Dataset:
    """Arrow dataset over the tenants' partitions (files pruned by tenant and date); empty if no table yet.

    Partition pruning only: apply `row_filter` (or SQL in DuckDB) for exact rows.
    """
    table = open_table(settings, TABLE_NAME)
    if table is None or not tenant_ids:
        return ds.InMemoryDataset(TELEMETRY_SCHEMA.empty_table())
    return table.to_pyarrow_dataset(file_pruning_predicate=pruning_filters(tenant_ids, start, end, days))


def read_telemetry(
    settings: Settings,
    tenant_ids: Sequence[str],
    device_ids: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    days: Iterable[date] | None = None,
) -> pa.Table:
    """Readings of the given tenants from the lake (ts in [start, end)), in READING_SCHEMA, sorted.

    Sorted by tenant_id, device_id, metric, ts. Only the tenants named are ever read: pass the
    caller's visible tenants, never an empty list meaning "all".
    """
    days = None if days is None else list(days)
    dataset = telemetry_dataset(settings, tenant_ids, start, end, days)
    result = dataset.to_table(
        columns=READING_SCHEMA.names, filter=row_filter(tenant_ids, device_ids, metrics, start, end, days)
    )
    result = result.sort_by([("tenant_id", "ascending"), *((c, "ascending") for c in SORT_COLUMNS)])
    return result.cast(READING_SCHEMA)
