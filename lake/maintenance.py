"""Delta table upkeep: small-file compaction with z-order, vacuum, and history.

Compaction writes each tenant-day as one sorted file, so most partitions never need optimising;
partitions that collected several files (writers that append, very large days, interrupted
maintenance) are rewritten clustered by `device_id`. Vacuum deletes files no live version
references once they are older than the retention, which is never shorter than the table's
`delta.deletedFileRetentionDuration` (7 days by default) unless forced: readers of an older
version (a long query, a time-travel read) keep working inside that window.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Any

import psycopg
from deltalake import CommitProperties, DeltaTable, WriterProperties

from lake.storage import LakeError, check_tenant_id, open_table
from lake.telemetry import TABLE_NAME, lock_partition
from sensormine.settings import Settings

ZORDER_COLUMNS = ("device_id",)
SAFE_VACUUM_HOURS = 168


@dataclass(frozen=True)
class OptimizeResult:
    """What `optimize_partition` did to one tenant-day."""

    tenant_id: str
    day: date
    files_before: int
    files_after: int
    table_version: int | None  # None when the partition was already one file and was left alone


def _table(settings: Settings, name: str) -> DeltaTable:
    table = open_table(settings, name)
    if table is None:
        raise LakeError(f"lake table {name!r} does not exist under {settings.lake_root}")
    return table


def partition_file_counts(table: DeltaTable) -> dict[tuple[str, date], int]:
    """Live data files per (tenant_id, date) partition of a tenant-partitioned table."""
    actions = table.get_add_actions(flatten=True)
    counts: dict[tuple[str, date], int] = defaultdict(int)
    tenants = actions.column("partition.tenant_id").to_pylist()
    days = actions.column("partition.date").to_pylist()
    for tenant_id, day in zip(tenants, days, strict=True):
        counts[(tenant_id, day if isinstance(day, date) else date.fromisoformat(str(day)))] += 1
    return dict(counts)


def optimize_partition(
    settings: Settings,
    name: str,
    tenant_id: str,
    day: date,
    min_files: int = 2,
    zorder_by: tuple[str, ...] = ZORDER_COLUMNS,
) -> OptimizeResult:
    """Rewrite one tenant-day partition as few large files clustered by `zorder_by`, if it has >= min_files."""
    table = _table(settings, name)
    before = partition_file_counts(table).get((check_tenant_id(tenant_id), day), 0)
    if before < min_files:
        return OptimizeResult(tenant_id, day, before, before, None)
    table.optimize.z_order(
        list(zorder_by),
        partition_filters=[("tenant_id", "=", tenant_id), ("date", "=", day.isoformat())],
        writer_properties=WriterProperties(compression="ZSTD"),
        commit_properties=CommitProperties(
            custom_metadata={"sensormine.operation": "optimize", "tenant_id": tenant_id, "date": str(day)}
        ),
    )
    after = partition_file_counts(table).get((tenant_id, day), 0)
    return OptimizeResult(tenant_id, day, before, after, table.version())


def optimize_table(
    settings: Settings, name: str, since: date | None = None, min_files: int = 2
) -> list[OptimizeResult]:
    """Optimise every partition (from `since` on) that has at least `min_files` files; returns those rewritten."""
    table = _table(settings, name)
    todo = sorted(
        key for key, n in partition_file_counts(table).items() if n >= min_files and (since is None or key[1] >= since)
    )
    return [optimize_partition(settings, name, t, d, min_files) for t, d in todo]


def cluster_closed_days(conn: psycopg.Connection, settings: Settings, today: date) -> list[OptimizeResult]:
    """Z-order by device_id every compacted telemetry tenant-day before `today` not clustered since its compaction.

    Compaction writes rows in arrival order (fast, bounded memory); once a day is closed this
    rewrite clusters it so that readers of one device skip most of the partition. Each
    tenant-day is rewritten under its compaction lock and marked in `lake_compactions`.
    """
    todo = conn.execute(
        "SELECT tenant_id, day FROM lake_compactions WHERE clustered_at IS NULL AND day < %s AND row_count > 0 "
        "ORDER BY day, tenant_id",
        (today,),
    ).fetchall()
    conn.commit()
    results = []
    for tenant_id, day in todo:
        with conn.transaction():
            lock_partition(conn, tenant_id, day)
            still = conn.execute(
                "SELECT 1 FROM lake_compactions WHERE tenant_id = %s AND day = %s AND clustered_at IS NULL",
                (tenant_id, day),
            ).fetchone()
            if still is None:
                continue
            result = optimize_partition(settings, TABLE_NAME, tenant_id, day, min_files=1)
            conn.execute(
                "UPDATE lake_compactions SET clustered_at = now() WHERE tenant_id = %s AND day = %s", (tenant_id, day)
            )
        results.append(result)
    return results


def vacuum_table(
    settings: Settings, name: str, retention_hours: int = SAFE_VACUUM_HOURS, dry_run: bool = False, force: bool = False
) -> list[str]:
    """Delete files no version newer than `retention_hours` references; returns their paths.

    Without `force`, a retention shorter than the table's deleted-file retention is refused
    (delta-rs raises), so a reader of a recent older version never loses its files.
    """
    if retention_hours < 0:
        raise LakeError("retention_hours must be >= 0")
    table = _table(settings, name)
    return table.vacuum(
        retention_hours=retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=not force,
        commit_properties=CommitProperties(custom_metadata={"sensormine.operation": "vacuum"}),
    )


def table_history(settings: Settings, name: str, limit: int | None = 20) -> list[dict[str, Any]]:
    """The table's commits, newest first: version, timestamp, operation, parameters, our custom metadata."""
    return _table(settings, name).history(limit)
