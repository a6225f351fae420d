"""Lake housekeeping: optimise small files, vacuum, and apply retention per tenant plan (daily job)."""

from datetime import UTC, date, datetime, timedelta

import dagster as dg

from lake.maintenance import SAFE_VACUUM_HOURS, cluster_closed_days, optimize_table, vacuum_table
from lake.retention import TENANT_TABLES, apply_hot_retention, apply_lake_retention
from lake.storage import open_table
from orchestration.resources import HotStoreResource, LakeResource


class HousekeepingConfig(dg.Config):
    """Run configuration of the housekeeping job."""

    dry_run: bool = False
    optimize_days: int = 7  # partitions of the last N days are candidates for optimize
    vacuum_retention_hours: int = SAFE_VACUUM_HOURS
    today: str | None = None  # ISO date; defaults to the run's UTC date (set it to replay a past day)

    def run_date(self) -> date:
        return date.fromisoformat(self.today) if self.today else datetime.now(UTC).date()


@dg.op(
    description="Cluster closed telemetry days by device_id (z-order), and merge partitions that hold several files."
)
def optimize_lake(
    context: dg.OpExecutionContext, config: HousekeepingConfig, hot_store: HotStoreResource, lake: LakeResource
) -> int:
    """Z-order newly closed telemetry days, optimise recent multi-file partitions; returns partitions rewritten."""
    settings = lake.settings()
    since = config.run_date() - timedelta(days=config.optimize_days)
    rewritten = 0
    if not config.dry_run:
        with hot_store.connect() as conn:
            for r in cluster_closed_days(conn, settings, config.run_date()):
                context.log.info(f"telemetry {r.tenant_id} {r.day}: clustered by device_id, version {r.table_version}")
                rewritten += 1
    for name in TENANT_TABLES:
        if config.dry_run or open_table(settings, name) is None:
            continue
        for r in optimize_table(settings, name, since=since):
            context.log.info(f"{name} {r.tenant_id} {r.day}: {r.files_before} files -> {r.files_after}")
            rewritten += 1
    return rewritten


@dg.op(description="Move hot-store days the lake holds and no plan keeps out of PostgreSQL (drop day partitions).")
def hot_retention(context: dg.OpExecutionContext, config: HousekeepingConfig, hot_store: HotStoreResource) -> int:
    """Apply hot-store retention; returns the number of day partitions dropped."""
    with hot_store.connect() as conn:
        decisions = apply_hot_retention(conn, config.run_date(), dry_run=config.dry_run)
    for d in decisions:
        verb = ("would drop" if config.dry_run else "dropped") if d.dropped else "kept"
        context.log.info(f"hot day {d.day} ({d.rows} rows): {verb}: {d.reason}")
    return sum(d.dropped for d in decisions)


@dg.op(description="Remove lake partitions older than each tenant's plan keeps.")
def lake_retention(
    context: dg.OpExecutionContext,
    config: HousekeepingConfig,
    hot_store: HotStoreResource,
    lake: LakeResource,
    after_hot: int,
) -> int:
    """Apply lake retention (after hot retention, which needs the lake's copy); returns partitions removed."""
    with hot_store.connect() as conn:
        results = apply_lake_retention(conn, lake.settings(), config.run_date(), dry_run=config.dry_run)
    for r in results:
        context.log.info(f"{r.table}: {r.partitions} partitions of {r.tenant_id} before {r.cutoff} removed")
    return sum(r.partitions for r in results)


@dg.op(description="Delete data files no table version inside the retention window references.")
def vacuum_lake(
    context: dg.OpExecutionContext, config: HousekeepingConfig, lake: LakeResource, after: list[int]
) -> int:
    """Vacuum every tenant table (after optimize and retention produced their garbage); returns files deleted."""
    settings = lake.settings()
    deleted = 0
    for name in TENANT_TABLES:
        if open_table(settings, name) is None:
            continue
        files = vacuum_table(settings, name, config.vacuum_retention_hours, dry_run=config.dry_run)
        context.log.info(f"{name}: {len(files)} files {'to delete' if config.dry_run else 'deleted'}")
        deleted += len(files)
    return deleted


@dg.job(description="Daily lake upkeep: optimize, hot and lake retention per plan, then vacuum.")
def lake_housekeeping_job() -> None:
    """optimize and retention first, vacuum last."""
    optimized = optimize_lake()
    removed = lake_retention(hot_retention())
    vacuum_lake([optimized, removed])


lake_housekeeping_schedule = dg.ScheduleDefinition(
    name="lake_housekeeping_schedule",
    job=lake_housekeeping_job,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day at 03:30 UTC, after the previous day has been closed and checked.",
)
