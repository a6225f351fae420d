"""Where lake tables live and how delta-rs reaches them (local folder or s3://).

Every lake table is partitioned by `tenant_id` and `date` (ARCHITECTURE.md), and every writer
replaces whole tenant-day partitions, which keeps re-runs and backfills idempotent.
"""

from __future__ import annotations

from datetime import date

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import DeltaError

from sensormine.settings import Settings
from sensormine.tenancy.tenants import TENANT_ID_RE

PARTITION_COLUMNS = ["tenant_id", "date"]


class LakeError(ValueError):
    """A lake request that cannot be honoured (bad tenant id, bad bounds)."""


def check_tenant_id(tenant_id: str) -> str:
    """The tenant id, after checking it is a registry-shaped id (it ends up in a SQL predicate)."""
    if not TENANT_ID_RE.match(tenant_id):
        raise LakeError(f"invalid tenant id {tenant_id!r}")
    return tenant_id


def partition_predicate(tenant_id: str, day: date) -> str:
    """The delta-rs SQL predicate selecting exactly one tenant-day partition."""
    return f"tenant_id = '{check_tenant_id(tenant_id)}' AND date = '{day.isoformat()}'"


def table_uri(settings: Settings, name: str) -> str:
    """URI of the lake table `name` under the configured lake root."""
    return f"{settings.lake_root}/{name}"


def open_table(settings: Settings, name: str) -> DeltaTable | None:
    """The lake table `name` at its latest version, or None when it has not been created yet."""
    uri = table_uri(settings, name)
    opts = settings.storage_options()
    if not DeltaTable.is_deltatable(uri, storage_options=opts):
        return None
    return DeltaTable(uri, storage_options=opts)


def ensure_table(settings: Settings, name: str, schema: pa.Schema, description: str) -> DeltaTable:
    """The lake table `name`, created empty (schema, tenant_id/date partitioning) if it does not exist yet."""
    table = open_table(settings, name)
    if table is not None:
        return table
    try:
        return DeltaTable.create(
            table_uri(settings, name),
            schema=schema,
            partition_by=PARTITION_COLUMNS,
            mode="ignore",
            name=name,
            description=description,
            storage_options=settings.storage_options(),
        )
    except DeltaError:
        # Another writer created it between our check and our commit: theirs is the same table.
        table = open_table(settings, name)
        if table is None:
            raise
        return table


def replace_partition(
    table: DeltaTable,
    data: pa.Table | pa.RecordBatchReader,
    tenant_id: str,
    day: date,
    operation: str,
) -> int:
    """Replace one tenant-day partition of `table` with `data` in one commit; returns the new version.

    The overwrite is limited to the partition's predicate, and delta-rs refuses rows outside it,
    so a row can never land under the wrong tenant or day. An empty `data` empties the partition.
    """
    write_deltalake(
        table,
        data,
        mode="overwrite",
        predicate=partition_predicate(tenant_id, day),
        writer_properties=WriterProperties(compression="ZSTD"),
        commit_properties=CommitProperties(
            custom_metadata={"sensormine.operation": operation, "tenant_id": tenant_id, "date": str(day)}
        ),
    )
    # The table object now points at the commit just made, even if other writers follow it.
    return table.version()


def read_partition(
    settings: Settings, name: str, schema: pa.Schema, tenant_id: str, day: date, sort_by: list[str] | None = None
) -> pa.Table:
    """One tenant-day partition of the lake table `name` in `schema` (empty when table or partition is missing).

    Sorted by `sort_by` when given: delta-rs may interleave a writer's batches within a file, so the
    physical row order is not a contract.
    """
    table = open_table(settings, name)
    if table is None:
        return schema.empty_table()
    dataset = table.to_pyarrow_dataset(
        partitions=[("tenant_id", "=", check_tenant_id(tenant_id)), ("date", "=", day.isoformat())]
    )
    result = dataset.to_table(columns=schema.names).cast(schema)
    return result.sort_by([(c, "ascending") for c in sort_by]) if sort_by else result
