"""Daily usage per tenant: what the `usage_daily` asset computes and writes (docs/billing.md, "Usage rollups").

For one tenant-day:

- `api_calls`, `ml_inference`: the usage ledger's counts (`usage`, flushed from the API's and the
  scorers' counters);
- `active_devices`, `readings`: devices that sent data that day and readings accepted, from the
  lake's telemetry partition (the asset runs after its compaction);
- `storage`: bytes held in the hot store (`pg_column_size` of the tenant's rows) plus the lake
  (Delta file sizes of the tenant's partitions), measured into `tenant_usage_snapshots` when the
  day is today or yesterday; an older day keeps the snapshot it has (or has none).

Written to PostgreSQL (`usage_daily`, for the API) and to the Delta table `{lake}/usage_daily`
(partitions tenant_id/date), both replaced whole for the tenant-day, so a re-run or backfill is
idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from lake.rollups import ROLLUP_1H, ROLLUP_1M
from lake.storage import check_tenant_id, ensure_table, open_table, replace_partition
from lake.telemetry import TABLE_NAME as TELEMETRY
from sensormine.limits.storage import check_storage_quota
from sensormine.metering.records import (
    ACTIVE_DEVICES,
    ADDITIVE,
    READINGS,
    STORAGE,
    STORAGE_MONTH,
    UNITS,
    UsageRecord,
)
from sensormine.settings import Settings

TABLE_NAME = "usage_daily"
QUANTITY = pa.decimal128(38, 9)
USAGE_SCHEMA = pa.schema(
    [
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("resource", pa.string(), nullable=False),
        pa.field("quantity", QUANTITY, nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("date", pa.date32(), nullable=False),
    ]
)
# Lake tables holding a tenant's data, partitioned by tenant_id: their files are its lake bytes.
STORAGE_TABLES = (TELEMETRY, ROLLUP_1M.name, ROLLUP_1H.name)


@dataclass(frozen=True)
class UsageDay:
    """What `write_usage_day` wrote: the records, the Delta version, whether storage was measured now."""

    records: list[UsageRecord]
    table_version: int
    snapshot_taken: bool
    quota_events: tuple[str, ...] = ()


def lake_bytes(settings: Settings, tenant_id: str) -> int:
    """Bytes of the tenant's files in the lake's tenant-partitioned tables."""
    total = 0
    for name in STORAGE_TABLES:
        table = open_table(settings, name)
        if table is None:
            continue
        actions = pa.table(table.get_add_actions(flatten=True))
        if actions.num_rows:
            mine = actions.filter(pc.equal(actions["partition.tenant_id"], tenant_id))
            total += int(pc.sum(mine["size_bytes"]).as_py() or 0)
    return total


def hot_bytes(lake_conn: psycopg.Connection, tenant_id: str) -> int:
    """Bytes of the tenant's rows in the hot store (tuple sizes; indexes and page overhead excluded)."""
    row = lake_conn.execute(
        "SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM telemetry t WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    lake_conn.commit()
    return int(row[0]) if row else 0


def _device_ids(settings: Settings, tenant_id: str, days: list[date]) -> pa.ChunkedArray | None:
    """The device id of every reading of the tenant on `days` in the lake (None: no telemetry table yet)."""
    table = open_table(settings, TELEMETRY)
    if table is None:
        return None
    partitions = [("tenant_id", "=", check_tenant_id(tenant_id)), ("date", "in", [d.isoformat() for d in days])]
    return table.to_pyarrow_dataset(partitions=partitions).to_table(columns=["device_id"])["device_id"]


def _telemetry_counts(settings: Settings, tenant_id: str, day: date) -> tuple[int, int]:
    devices = _device_ids(settings, tenant_id, [day])
    return (0, 0) if devices is None else (len(devices), len(pc.unique(devices)))


def _snapshot(
    settings: Settings, metering: psycopg.Connection, lake_conn: psycopg.Connection, tenant_id: str, day: date,
    today: date,
) -> tuple[int | None, bool]:  # fmt: skip
    """The tenant's stored bytes attributed to `day` (measured now when `day` is today or yesterday)."""
    if day >= today - timedelta(days=1):
        held = hot_bytes(lake_conn, tenant_id), lake_bytes(settings, tenant_id)
        with metering.transaction():
            metering.execute(
                "INSERT INTO tenant_usage_snapshots (tenant_id, day, devices, hot_bytes, lake_bytes) "
                "VALUES (%s, %s, (SELECT count(*) FROM devices WHERE tenant_id = %s), %s, %s) "
                "ON CONFLICT (tenant_id, day) DO UPDATE SET devices = excluded.devices, "
                "hot_bytes = excluded.hot_bytes, lake_bytes = excluded.lake_bytes, taken_at = now()",
                (tenant_id, day, tenant_id, *held),
            )
        return sum(held), True
    with metering.transaction():
        row = metering.execute(
            "SELECT hot_bytes + lake_bytes FROM tenant_usage_snapshots WHERE tenant_id = %s AND day = %s",
            (tenant_id, day),
        ).fetchone()
    return (int(row[0]) if row else None), False


def compute_usage_day(
    settings: Settings, metering: psycopg.Connection, lake_conn: psycopg.Connection, tenant_id: str, day: date,
    today: date | None = None,
) -> tuple[list[UsageRecord], bool]:  # fmt: skip
    """The tenant-day's usage records, and whether storage was measured now (`metering` as the metering
    role, `lake_conn` as the lake role, both idle)."""
    today = today or datetime.now(UTC).date()
    at = datetime.combine(day, time(), UTC)
    with metering.transaction():
        ledger = metering.execute(
            "SELECT metric, value FROM usage WHERE tenant_id = %s AND day = %s ORDER BY metric", (tenant_id, day)
        ).fetchall()
    counts: dict[str, int] = {str(metric): int(value) for metric, value in ledger if metric in UNITS}
    counts[READINGS], counts[ACTIVE_DEVICES] = _telemetry_counts(settings, tenant_id, day)
    stored, measured = _snapshot(settings, metering, lake_conn, tenant_id, day, today)
    records = [UsageRecord(tenant_id, at, r, Decimal(n), UNITS[r]) for r, n in sorted(counts.items())]
    if stored is not None:
        source = "measured" if measured else "snapshot"
        records.append(UsageRecord(tenant_id, at, STORAGE, Decimal(stored), UNITS[STORAGE], {"source": source}))
    return records, measured


def write_usage_day(
    settings: Settings, metering: psycopg.Connection, lake_conn: psycopg.Connection, tenant_id: str, day: date,
    today: date | None = None,
) -> UsageDay:  # fmt: skip
    """Compute the tenant-day's usage and replace it in the lake and in `usage_daily`."""
    records, measured = compute_usage_day(settings, metering, lake_conn, tenant_id, day, today)
    rows = pa.table(
        {
            "tenant_id": [r.tenant_id for r in records],
            "resource": [r.resource_type for r in records],
            "quantity": pa.array([r.quantity for r in records], QUANTITY),
            "unit": [r.unit for r in records],
            "date": pa.array([day] * len(records), pa.date32()),
        },
        schema=USAGE_SCHEMA,
    )
    table = ensure_table(settings, TABLE_NAME, USAGE_SCHEMA, "Usage per tenant, UTC day and metered resource.")
    version = replace_partition(table, rows, tenant_id, day, "usage:daily")
    _replace_rows(metering, "usage_daily", "day", tenant_id, day, records)
    events: list[str] = []
    if measured:  # a new measurement: the plan's storage quota may be near or past
        with metering.transaction():
            events = check_storage_quota(metering, tenant_id, day).events
    return UsageDay(records, version, measured, tuple(events))


def _replace_rows(
    metering: psycopg.Connection, table: str, period: str, tenant_id: str, start: date, records: list[UsageRecord]
) -> None:
    """Replace the tenant's rows of one period (`period` column = `start`) of a usage table, in one transaction."""
    names = {"table": sql.Identifier(table), "period": sql.Identifier(period)}
    with metering.transaction():
        metering.execute(
            sql.SQL("DELETE FROM {table} WHERE tenant_id = %s AND {period} = %s").format(**names), (tenant_id, start)
        )
        with metering.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {table} (tenant_id, {period}, resource, quantity, unit) VALUES (%s, %s, %s, %s, %s)"
                ).format(**names),
                [(r.tenant_id, start, r.resource_type, r.quantity, r.unit) for r in records],
            )


def month_days(month: date) -> list[date]:
    """Every day of the month starting at `month` (its first day)."""
    following = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return [month + timedelta(days=i) for i in range((following - month).days)]


def compute_usage_month(
    settings: Settings, metering: psycopg.Connection, tenant_id: str, month: date
) -> list[UsageRecord]:
    """The month's usage records: sums of the additive resources' daily rows, devices active on any day
    of the month (distinct, from the lake), and storage as the mean of the month's snapshots in GB."""
    days = month_days(month)
    at = datetime.combine(month, time(), UTC)
    with metering.transaction():
        sums: dict[str, Decimal] = dict(
            metering.execute(
                "SELECT resource, sum(quantity) FROM usage_daily WHERE tenant_id = %s AND day >= %s AND day <= %s "
                "AND resource = ANY(%s) GROUP BY resource",
                (tenant_id, days[0], days[-1], list(ADDITIVE)),
            ).fetchall()
        )
        stored = metering.execute(
            "SELECT avg(hot_bytes + lake_bytes), count(*) FROM tenant_usage_snapshots "
            "WHERE tenant_id = %s AND day >= %s AND day <= %s",
            (tenant_id, days[0], days[-1]),
        ).fetchone()
    records = [UsageRecord(tenant_id, at, r, Decimal(sums[r]), UNITS[r]) for r in ADDITIVE if r in sums]
    devices = _device_ids(settings, tenant_id, days)
    if devices is not None:
        active = len(pc.unique(devices))
        if active or sums:
            records.append(UsageRecord(tenant_id, at, ACTIVE_DEVICES, Decimal(active), UNITS[ACTIVE_DEVICES]))
    if stored is not None and stored[1]:
        gb = (Decimal(stored[0]) / Decimal(10**9)).quantize(Decimal("0.000001"))
        meta = {"snapshots": str(stored[1]), "days": str(len(days))}
        records.append(UsageRecord(tenant_id, at, STORAGE_MONTH, gb, UNITS[STORAGE_MONTH], meta))
    return sorted(records, key=lambda r: r.resource_type)


def write_usage_month(
    settings: Settings, metering: psycopg.Connection, tenant_id: str, month: date
) -> list[UsageRecord]:
    """Compute the tenant's month and replace its `usage_monthly` rows (metering role, idle)."""
    records = compute_usage_month(settings, metering, tenant_id, month)
    _replace_rows(metering, "usage_monthly", "month", tenant_id, month, records)
    return records
