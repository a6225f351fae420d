"""Retention per tenant plan, for the hot store and for the lake.

Hot store: a day partition of `telemetry` holds every tenant's readings of that UTC day, so it is
dropped whole, and only when (a) the day is older than the longest hot retention among the plans
of the tenants that have rows in it, and (b) for every one of those tenants the lake holds the
day: a compaction recorded in `lake_compactions` whose row-count check passed
(`verified_rows = row_count`) and whose row count still equals the hot rows (no late rows since).
Both conditions are checked again after taking an exclusive lock on the partition, in the
transaction that drops it, so no row can slip in between the check and the drop.

Lake: each tenant's partitions older than its plan's lake retention are removed from every
tenant-partitioned lake table (a metadata-only Delta delete: partition columns only), together
with their `lake_compactions` records. The files themselves go at the next vacuum.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

import psycopg

from lake.maintenance import partition_file_counts
from lake.rollups import ROLLUPS
from lake.storage import check_tenant_id, open_table
from lake.telemetry import TABLE_NAME
from sensormine.clients.postgres import existing_partition_days
from sensormine.settings import Settings
from sensormine.tenancy.plans import PlanError, get_plan

# Lake tables partitioned by tenant_id/date whose history follows the tenant's plan.
TENANT_TABLES = (TABLE_NAME, *ROLLUPS)
_RETENTION_LOCK = 7_351_102


@dataclass(frozen=True)
class HotDayDecision:
    """What hot-store retention decided for one day partition."""

    day: date
    dropped: bool
    rows: int
    reason: str


@dataclass(frozen=True)
class LakeRetentionResult:
    """Partitions one tenant lost from one lake table."""

    tenant_id: str
    table: str
    cutoff: date
    partitions: int


def _tenant_rows(conn: psycopg.Connection, day: date) -> dict[str, int]:
    # Through the parent (its policies apply; nobody reads a partition directly), pruned to the day's.
    rows = conn.execute(
        "SELECT tenant_id, count(*) FROM telemetry WHERE ts >= %s::date::timestamp AT TIME ZONE 'UTC' "
        "AND ts < (%s::date + 1)::timestamp AT TIME ZONE 'UTC' GROUP BY tenant_id",
        (day, day),
    ).fetchall()
    return {t: n for t, n in rows}


def _blockers(conn: psycopg.Connection, day: date, today: date, counts: dict[str, int]) -> list[str]:
    """Why the day partition may not be dropped yet (empty when it may)."""
    if not counts:
        return []
    plans: dict[str, str] = dict(
        conn.execute(
            "SELECT id, sensormine_contract_plan(id) FROM tenants WHERE id = ANY(%s)", (list(counts),)
        ).fetchall()
    )
    reasons = []
    keep_days = 0
    for tenant_id in sorted(counts):
        try:
            keep_days = max(keep_days, get_plan(plans[tenant_id]).hot_retention_days)
        except (KeyError, PlanError):
            reasons.append(f"{tenant_id}: tenant or plan unknown, kept")
    if day >= today - timedelta(days=keep_days):
        reasons.append(f"inside the hot retention ({keep_days} days) of a tenant's plan")
        return reasons
    recorded = {
        t: (rows, verified)
        for t, rows, verified in conn.execute(
            "SELECT tenant_id, row_count, verified_rows FROM lake_compactions WHERE day = %s AND tenant_id = ANY(%s)",
            (day, list(counts)),
        ).fetchall()
    }
    for tenant_id, hot_rows in sorted(counts.items()):
        if tenant_id not in recorded:
            reasons.append(f"{tenant_id}: not compacted into the lake")
            continue
        lake_rows, verified = recorded[tenant_id]
        if verified is None or verified != lake_rows:
            reasons.append(f"{tenant_id}: lake row-count check has not passed")
        elif lake_rows != hot_rows:
            reasons.append(f"{tenant_id}: {hot_rows - lake_rows} rows arrived after the compaction; re-materialise it")
    return reasons


def _decide(conn: psycopg.Connection, day: date, today: date) -> tuple[int, list[str], list[str]]:
    counts = _tenant_rows(conn, day)
    return sum(counts.values()), sorted(counts), _blockers(conn, day, today, counts)


def apply_hot_retention(conn: psycopg.Connection, today: date, dry_run: bool = False) -> list[HotDayDecision]:
    """Drop the past hot-store day partitions that the lake holds and no plan keeps; one decision per past day."""
    decisions = []
    for day in sorted(d for d in existing_partition_days(conn) if d < today):
        with conn.transaction():
            rows, tenants, reasons = _decide(conn, day, today)
        if not reasons and not dry_run:
            with conn.transaction():
                # Decide again under an exclusive lock: no writer can add a row between check and drop.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_RETENTION_LOCK,))
                # The partition belongs to the schema owner: these functions (migration 016) act for it.
                conn.execute("SELECT sensormine_lock_day_partition(%s)", (day,))
                rows, tenants, reasons = _decide(conn, day, today)
                if not reasons:
                    conn.execute("SELECT sensormine_drop_day_partition(%s)", (day,))
                    # No hot rows of the day are left to be late; writers wait on the lock, so none is lost.
                    conn.execute("DELETE FROM hot_write_log WHERE day = %s", (day,))
        if reasons:
            decisions.append(HotDayDecision(day, False, rows, "; ".join(reasons)))
        else:
            held = ", ".join(tenants) or "no tenant"
            decisions.append(HotDayDecision(day, True, rows, f"in the lake and verified ({held})"))
    return decisions


def lake_partitions_before(settings: Settings, table_name: str, tenant_id: str, cutoff: date) -> list[date]:
    """The days of one tenant's partitions in a lake table that lie before `cutoff`."""
    table = open_table(settings, table_name)
    if table is None:
        return []
    return sorted(d for t, d in partition_file_counts(table) if t == tenant_id and d < cutoff)


def apply_lake_retention(
    conn: psycopg.Connection, settings: Settings, today: date, dry_run: bool = False
) -> list[LakeRetentionResult]:
    """Remove every tenant's lake partitions older than its plan's lake retention; returns what went."""
    results = []
    for tenant_id, plan_name in conn.execute(
        "SELECT id, sensormine_contract_plan(id) FROM tenants ORDER BY id"
    ).fetchall():
        keep = get_plan(plan_name).lake_retention_days
        if keep is None:
            continue
        cutoff = today - timedelta(days=keep)
        for name in TENANT_TABLES:
            expired = lake_partitions_before(settings, name, tenant_id, cutoff)
            if not expired:
                continue
            if not dry_run:
                table = open_table(settings, name)
                assert table is not None
                table.delete(f"tenant_id = '{check_tenant_id(tenant_id)}' AND date < '{cutoff.isoformat()}'")
            results.append(LakeRetentionResult(tenant_id, name, cutoff, len(expired)))
        if not dry_run:
            # The tiered query reads compacted days from the lake: forget the days the lake no longer has.
            conn.execute("DELETE FROM lake_compactions WHERE tenant_id = %s AND day < %s", (tenant_id, cutoff))
            # Days the lake no longer holds are read from the hot store whole: their late-write marks are moot.
            conn.execute("DELETE FROM hot_write_log WHERE tenant_id = %s AND day < %s", (tenant_id, cutoff))
            conn.commit()
    return results
