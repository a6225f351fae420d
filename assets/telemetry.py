"""Telemetry assets: the hot store's tenant-days compacted into the lake's Delta table."""

from contextlib import AbstractContextManager
from datetime import date
from typing import Protocol

import dagster as dg
import psycopg

from lake.storage import table_uri
from lake.telemetry import TABLE_NAME, compact_day
from sensormine.settings import Settings

TENANTS_PARTITIONS_NAME = "tenants"
DATE_DIMENSION = "date"
TENANT_DIMENSION = "tenant"

tenant_partitions = dg.DynamicPartitionsDefinition(name=TENANTS_PARTITIONS_NAME)
# end_offset=1 makes today a partition, so the hourly schedule can refresh the day in progress.
daily_partitions = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)
telemetry_partitions = dg.MultiPartitionsDefinition(
    {DATE_DIMENSION: daily_partitions, TENANT_DIMENSION: tenant_partitions}
)

TELEMETRY_LAKE_KEY = dg.AssetKey(["lake", "telemetry"])


class HotStore(Protocol):
    """What the asset needs from the `hot_store` resource (orchestration.resources.HotStoreResource)."""

    def connect(self, role: str = ...) -> AbstractContextManager[psycopg.Connection]: ...


class Lake(Protocol):
    """What the asset needs from the `lake` resource (orchestration.resources.LakeResource)."""

    def settings(self) -> Settings: ...


def telemetry_partition_key(tenant_id: str, day: date) -> dg.MultiPartitionKey:
    """The telemetry partition key of one tenant-day."""
    return dg.MultiPartitionKey({DATE_DIMENSION: day.isoformat(), TENANT_DIMENSION: tenant_id})


def parse_partition_key(key: str | dg.MultiPartitionKey) -> tuple[str, date]:
    """(tenant_id, day) of a telemetry partition key, given as MultiPartitionKey or its "date|tenant" string."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims[TENANT_DIMENSION], date.fromisoformat(dims[DATE_DIMENSION])
    # The string form joins the dimension keys in dimension-name order: "date" sorts before "tenant".
    day, sep, tenant_id = key.partition("|")
    if not sep or not tenant_id:
        raise ValueError(f"not a telemetry partition key (expected 'YYYY-MM-DD|tenant'): {key!r}")
    return tenant_id, date.fromisoformat(day)


@dg.asset(
    key=TELEMETRY_LAKE_KEY,
    partitions_def=telemetry_partitions,
    required_resource_keys={"hot_store", "lake"},
    group_name="telemetry",
    kinds={"deltalake", "postgres"},
    # Partitions are rewritten whole, so a retry after a failure is always safe.
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10),
    description="Readings of one tenant-day, copied from the hot store into the Delta table "
    "{lake}/telemetry (partitions tenant_id/date), replacing that partition entirely.",
)
def telemetry_lake(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Compact one tenant-day of the hot store into the lake."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    settings = lake.settings()
    with hot_store.connect() as conn:
        result = compact_day(conn, settings, tenant_id, day)
    context.log.info(f"compacted {result.rows} rows of {tenant_id} {day} into table version {result.table_version}")
    return dg.MaterializeResult(
        metadata={
            "rows": result.rows,
            "dagster/row_count": result.rows,
            "table_version": result.table_version,
            "uri": dg.MetadataValue.path(table_uri(settings, TABLE_NAME)),
            "hot_watermark": dg.MetadataValue.timestamp(result.hot_watermark)
            if result.hot_watermark
            else dg.MetadataValue.null(),
        }
    )
