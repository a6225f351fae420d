"""`sensormine dlq list|replay`: the dead letters ingest rejected, and their replay after a fix.

Reads the `{env}.dlq` topic (with Kafka) and the `dead_letters` table; see `sensormine.dlq`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import typer

from cli.common import fail
from sensormine.clients.postgres import INGEST, connect, migrate_database
from sensormine.dlq.letters import DeadLetter, DlqError, DlqFilter, Status, list_dead_letters
from sensormine.dlq.replay import ReplayReport, replay_matching
from sensormine.settings import get_settings

app = typer.Typer(
    help="Dead letters: list rejected messages, replay them after a schema or device fix.", no_args_is_help=True
)

TENANT = typer.Option(None, "--tenant", help="Only this tenant's dead letters (repeat for several).")
DEVICE = typer.Option(None, "--device", help="Only this device's dead letters.")
SOURCE = typer.Option(None, "--source", help="Only dead letters from this source (mqtt, http, consumer, ...).")
REASON = typer.Option(None, "--reason", help="Only dead letters whose reason contains this text (any case).")
SINCE = typer.Option(None, "--since", help="Only dead letters rejected at or after this ISO-8601 instant.")
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO-8601 instant", param_hint="--since") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _filter(
    tenant: list[str] | None,
    device: str | None,
    source: str | None,
    reason: str | None,
    since: str | None,
    status: Status,
    limit: int,
) -> DlqFilter:
    return DlqFilter(frozenset(tenant) if tenant else None, device, source, reason, _since(since), status, limit)


def entry_json(entry: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON: the payload as text when it is UTF-8, else None."""
    try:
        text: str | None = entry.payload.decode()
    except UnicodeDecodeError:
        text = None
    return {
        "id": entry.id,
        "status": entry.status,
        "rejected_at": entry.rejected_at.isoformat() if entry.rejected_at else None,
        "replayed_at": entry.replayed_at.isoformat() if entry.replayed_at else None,
        "source": entry.source,
        "origin": entry.origin,
        "tenant_id": entry.tenant_id,
        "device_id": entry.device_id,
        "reason": entry.reason,
        "headers": entry.headers,
        "payload": text,
        "payload_bytes": len(entry.payload),
    }


@app.command("list")
def list_command(
    tenant: list[str] | None = TENANT,
    device: str | None = DEVICE,
    source: str | None = SOURCE,
    reason: str | None = REASON,
    since: str | None = SINCE,
    status: str = typer.Option("all", help="pending, replayed or all."),
    limit: int = typer.Option(100, min=1, max=10_000, help="At most this many, oldest first."),
    as_json: bool = AS_JSON,
) -> None:
    """List dead letters, oldest first: id, rejected at, status, source, tenant/device, reason."""
    if status not in ("pending", "replayed", "all"):
        raise typer.BadParameter("must be pending, replayed or all", param_hint="--status")
    settings = get_settings()
    flt = _filter(tenant, device, source, reason, since, status, limit)  # type: ignore[arg-type]
    try:
        migrate_database(settings)
        with connect(settings, role=INGEST) as conn:
            entries = list_dead_letters(conn, settings, flt)
    except DlqError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(orjson.dumps([entry_json(e) for e in entries], option=orjson.OPT_INDENT_2).decode())
        return
    for e in entries:
        when = e.rejected_at.isoformat(timespec="seconds") if e.rejected_at else "-"
        typer.echo(f"{e.id}\t{when}\t{e.status}\t{e.source}\t{e.tenant_id or '-'}/{e.device_id or '-'}\t{e.reason}")
    typer.echo(f"{len(entries)} dead letter(s)", err=True)


def _print_report(report: ReplayReport, as_json: bool) -> None:
    if as_json:
        rows = [o.__dict__ for o in report.outcomes]
        typer.echo(orjson.dumps({"counts": report.counts, "outcomes": rows}, option=orjson.OPT_INDENT_2).decode())
        return
    for o in report.outcomes:
        detail = f"\t{o.reason}" if o.reason else (f"\t{o.readings} readings" if o.readings else "")
        typer.echo(f"{o.id}\t{o.outcome}{detail}")
    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(report.counts.items())) or "nothing to replay"
    typer.echo(summary)


@app.command("replay")
def replay_command(
    ids: list[str] | None = typer.Argument(None, help="Dead-letter ids (from `dlq list`); else the filters select."),
    tenant: list[str] | None = TENANT,
    device: str | None = DEVICE,
    source: str | None = SOURCE,
    reason: str | None = REASON,
    since: str | None = SINCE,
    every: bool = typer.Option(False, "--all", help="Replay every pending dead letter (up to --limit)."),
    limit: int = typer.Option(1000, min=1, max=10_000, help="At most this many pending dead letters."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check what would be re-submitted; submit nothing."),
    as_json: bool = AS_JSON,
) -> None:
    """Re-submit pending dead letters through the path of their origin, after a schema or device fix.

    Each is checked first as that path would check it: those still invalid stay pending (the new reason
    is printed), the others are re-submitted and recorded, so a second replay skips them. Exits 1 when
    a re-submission failed or an id was not found.
    """
    if not ids and not every and not any((tenant, device, source, reason, since)):
        raise typer.BadParameter("name dead-letter ids, a filter (--tenant, --device, ...) or --all")
    settings = get_settings()
    flt = _filter(tenant, device, source, reason, since, "pending", limit)
    try:
        migrate_database(settings)
        with connect(settings, role=INGEST) as conn:
            report = replay_matching(conn, settings, ids=ids or None, flt=flt, replayed_by="cli", dry_run=dry_run)
    except DlqError as exc:
        fail(str(exc))
    _print_report(report, as_json)
    if report.count("failed") or report.count("not_found"):
        raise typer.Exit(1)
