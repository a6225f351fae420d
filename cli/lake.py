"""`sensormine lake ...`: compaction, rollups, maintenance, retention and history without the Dagster UI.

The lake code lives in the `lake` package, which `sensormine` may not import at module level:
each command imports what it needs when it runs.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import typer

from cli.common import fail
from sensormine.clients.postgres import LAKE, connect, migrate_database
from sensormine.settings import get_settings

app = typer.Typer(help="The Delta lake: compact, optimize, vacuum, retention, history.", no_args_is_help=True)


def _day(value: str | None) -> date:
    if value is None:
        return datetime.now(UTC).date()
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date (YYYY-MM-DD)") from None


@app.command("compact")
def compact(
    tenant_id: str,
    day: str = typer.Argument(None, help="UTC day, YYYY-MM-DD (default: today)."),
    rollups: bool = typer.Option(True, help="Also rewrite telemetry_1m and telemetry_1h for the day."),
) -> None:
    """Copy one tenant-day from the hot store into the lake (what the Dagster asset does)."""
    from lake.rollups import ROLLUP_1H, ROLLUP_1M, write_rollup
    from lake.storage import LakeError
    from lake.telemetry import compact_day

    settings = get_settings()
    when = _day(day)
    try:
        migrate_database(settings)
        with connect(settings, role=LAKE) as conn:
            result = compact_day(conn, settings, tenant_id, when)
        typer.echo(f"telemetry: {result.rows} rows of {tenant_id} {when}, table version {result.table_version}")
        if rollups:
            for rollup in (ROLLUP_1M, ROLLUP_1H):
                r = write_rollup(settings, rollup, tenant_id, when)
                typer.echo(
                    f"{rollup.name}: {r.rows} buckets over {r.readings} readings, table version {r.table_version}"
                )
    except LakeError as exc:
        fail(str(exc))


@app.command("history")
def history(
    table: str = typer.Argument("telemetry", help="Lake table name."),
    limit: int = typer.Option(20, help="Newest N commits."),
) -> None:
    """The table's commits, newest first."""
    from lake.maintenance import table_history
    from lake.storage import LakeError

    try:
        commits = table_history(get_settings(), table, limit)
    except LakeError as exc:
        fail(str(exc))
        return
    typer.echo(f"{'version':>7}  {'time (UTC)':<19}  {'operation':<14}  {'by':<22}  partition")
    for c in commits:
        stamp = datetime.fromtimestamp(c.get("timestamp", 0) / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        part = f"{c['tenant_id']}/{c['date']}" if "tenant_id" in c and "date" in c else ""
        by = str(c.get("sensormine.operation", ""))
        typer.echo(f"{c.get('version', '?'):>7}  {stamp:<19}  {c.get('operation', ''):<14}  {by:<22}  {part}")


@app.command("optimize")
def optimize(
    table: str = typer.Argument("telemetry", help="Lake table name."),
    days: int = typer.Option(7, help="Consider partitions of the last N days (0: all)."),
    min_files: int = typer.Option(2, help="Rewrite partitions with at least this many files."),
) -> None:
    """Merge small files of recent partitions, clustered by device_id (z-order)."""
    from lake.maintenance import optimize_table
    from lake.storage import LakeError

    since = _day(None) - timedelta(days=days) if days else None
    try:
        results = optimize_table(get_settings(), table, since=since, min_files=min_files)
    except LakeError as exc:
        fail(str(exc))
        return
    for r in results:
        typer.echo(f"{r.tenant_id} {r.day}: {r.files_before} files -> {r.files_after} (version {r.table_version})")
    typer.echo(f"{len(results)} partition(s) optimized")


@app.command("vacuum")
def vacuum(
    table: str = typer.Argument("telemetry", help="Lake table name."),
    retention_hours: int = typer.Option(168, help="Keep files that versions of the last N hours use."),
    dry_run: bool = typer.Option(False, help="List what would be deleted, delete nothing."),
    force: bool = typer.Option(False, help="Allow a retention below the table's safe minimum (7 days)."),
) -> None:
    """Delete data files that no version inside the retention window uses."""
    from deltalake.exceptions import DeltaError

    from lake.maintenance import vacuum_table
    from lake.storage import LakeError

    try:
        files = vacuum_table(get_settings(), table, retention_hours, dry_run=dry_run, force=force)
    except (LakeError, DeltaError) as exc:
        fail(f"{exc} (use --force to go below the table's minimum retention, if no reader needs old versions)")
        return
    for f in files:
        typer.echo(f)
    typer.echo(f"{len(files)} file(s) {'would be ' if dry_run else ''}deleted")


@app.command("retention")
def retention(
    dry_run: bool = typer.Option(False, help="Report decisions, change nothing."),
    today: str = typer.Option(None, help="Pretend today is this UTC day (YYYY-MM-DD)."),
) -> None:
    """Apply retention per plan: drop hot-store days the lake holds and verified, expire lake partitions."""
    from lake.retention import apply_hot_retention, apply_lake_retention

    settings = get_settings()
    when = _day(today)
    migrate_database(settings)
    with connect(settings, role=LAKE) as conn:
        for d in apply_hot_retention(conn, when, dry_run=dry_run):
            verb = ("would drop" if dry_run else "dropped") if d.dropped else "kept"
            typer.echo(f"hot {d.day} ({d.rows} rows): {verb}: {d.reason}")
        for r in apply_lake_retention(conn, settings, when, dry_run=dry_run):
            verb = "would remove" if dry_run else "removed"
            typer.echo(f"lake {r.table}: {verb} {r.partitions} partition(s) of {r.tenant_id} before {r.cutoff}")
