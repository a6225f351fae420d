"""Dead letters of the caller's tenants: `GET /api/dlq` lists them, `POST /api/dlq/replay` re-submits them.

A caller sees the dead letters of its own tenant and its sub-tenants (those naming no tenant are
an operator's business: `sensormine dlq`). Replaying needs the `write` scope. See docs/schemas.md.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Security
from pydantic import AwareDatetime, BaseModel, Field

from sensormine.clients.postgres import INGEST, connect
from sensormine.dlq.letters import MAX_LIMIT, DeadLetter, DlqError, DlqFilter, list_dead_letters
from sensormine.dlq.replay import ReplayOutcome, replay_selected, select_for_replay
from serving.deps import Caller, ConnDep, SettingsDep, authenticate
from serving.problems import Problem

router = APIRouter(prefix="/api/dlq", tags=["dlq"])


class DeadLetterOut(BaseModel):
    """One rejected message and why."""

    id: str = Field(description="`{topic}/{partition}/{offset}` in the DLQ topic, or `dead_letters/{n}`.")
    status: Literal["pending", "replayed"]
    rejected_at: datetime | None
    replayed_at: datetime | None
    source: str = Field(description="Who rejected it: mqtt, http, consumer, in-process, ...")
    origin: str | None = Field(description="MQTT topic, HTTP item, or Kafka position of the rejected message.")
    tenant_id: str | None
    device_id: str | None
    reason: str = Field(description="Why, with the failing JSON pointer where one applies.")
    headers: dict[str, str] = Field(description="Kafka headers (schema rejects: device_type, schema_version, pointer).")
    payload_text: str | None = Field(description="The original bytes as UTF-8 text, when they are.")
    payload_base64: str = Field(description="The original bytes.")


class DeadLetterList(BaseModel):
    """Dead letters, oldest first."""

    count: int
    items: list[DeadLetterOut]


class ReplayRequest(BaseModel):
    """Which dead letters to replay: `ids`, or else the pending ones matching the filters."""

    ids: list[str] | None = Field(None, max_length=MAX_LIMIT, description="Dead-letter ids from GET /api/dlq.")
    tenant_id: str | None = Field(None, description="One of the caller's tenants; all of them by default.")
    device_id: str | None = None
    source: str | None = None
    reason: str | None = Field(None, description="Substring of the reject reason (any case).")
    since: AwareDatetime | None = None
    limit: int = Field(100, ge=1, le=MAX_LIMIT)
    dry_run: bool = Field(False, description="Only check what would be re-submitted.")


class ReplayOutcomeOut(BaseModel):
    """What happened to one dead letter."""

    id: str
    outcome: Literal["resubmitted", "would_resubmit", "already_replayed", "still_rejected", "failed", "not_found"]
    reason: str | None = Field(description="Why it is still rejected, or why re-submitting failed.")
    tenant_id: str | None
    device_id: str | None
    readings: int
    schema_version: int | None = Field(description="The device schema version the readings were validated against.")


class ReplayResult(BaseModel):
    """Counts per outcome, and each dead letter's outcome."""

    counts: dict[str, int]
    outcomes: list[ReplayOutcomeOut]


def _out(entry: DeadLetter) -> DeadLetterOut:
    try:
        text: str | None = entry.payload.decode()
    except UnicodeDecodeError:
        text = None
    return DeadLetterOut(
        id=entry.id,
        status=entry.status,
        rejected_at=entry.rejected_at,
        replayed_at=entry.replayed_at,
        source=entry.source,
        origin=entry.origin,
        tenant_id=entry.tenant_id,
        device_id=entry.device_id,
        reason=entry.reason,
        headers=entry.headers,
        payload_text=text,
        payload_base64=base64.b64encode(entry.payload).decode(),
    )


def _tenants(caller: Caller, tenant_id: str | None) -> frozenset[str]:
    if tenant_id is None:
        return frozenset(caller.visible)
    if tenant_id not in caller.visible:
        raise Problem(404, f"tenant {tenant_id!r} not found")
    return frozenset([tenant_id])


def _outcome(o: ReplayOutcome) -> ReplayOutcomeOut:
    return ReplayOutcomeOut(**o.__dict__)


@router.get("", response_model=DeadLetterList, summary="List dead letters of the caller's tenants")
def list_dlq(
    caller: Annotated[Caller, Security(authenticate, scopes=["dlq:read"])],
    conn: ConnDep,
    settings: SettingsDep,
    tenant_id: Annotated[str | None, Query(description="One of the caller's tenants; all of them by default")] = None,
    device_id: str | None = None,
    source: Annotated[str | None, Query(description="mqtt, http, consumer, in-process, ...")] = None,
    reason: Annotated[str | None, Query(description="Substring of the reject reason (any case)")] = None,
    since: Annotated[AwareDatetime | None, Query(description="Rejected at or after, ISO-8601 with zone")] = None,
    status: Literal["pending", "replayed", "all"] = "all",
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> DeadLetterList:
    """Dead letters, oldest first, with their reason (JSON pointer included) and original bytes."""
    flt = DlqFilter(_tenants(caller, tenant_id), device_id, source, reason, since, status, limit)
    try:
        with caller.scope(conn):  # row-level security shows the caller's tenants' dead letters only
            entries = list_dead_letters(conn, settings, flt)
    except DlqError as exc:
        raise Problem(503, str(exc)) from None
    return DeadLetterList(count=len(entries), items=[_out(e) for e in entries])


@router.post(
    "/replay",
    response_model=ReplayResult,
    summary="Re-submit dead letters after a schema or device fix (permission dlq:write)",
    responses={403: {"description": "The caller lacks dlq:write."}, 503: {"description": "Try again."}},
)
def replay_dlq(
    caller: Annotated[Caller, Security(authenticate, scopes=["dlq:write"])],
    conn: ConnDep,
    settings: SettingsDep,
    body: ReplayRequest,
) -> ReplayResult:
    """Replay dead letters through the path of their origin; those still invalid stay pending.

    Each re-submitted dead letter is recorded, so replaying it again is skipped (`already_replayed`);
    ids of other tenants' dead letters are `not_found`.
    """
    flt = DlqFilter(
        _tenants(caller, body.tenant_id), body.device_id, body.source, body.reason, body.since, "pending", body.limit
    )
    try:
        # Which dead letters: under the caller's row-level security. The re-submission (the path of
        # their origin) and the replay records: as the ingest role.
        with caller.scope(conn):
            entries, missing = select_for_replay(conn, settings, ids=body.ids, flt=flt)
        with connect(settings, role=INGEST) as ingest:
            report = replay_selected(
                ingest, settings, entries, missing, replayed_by=f"api:{caller.subject}", dry_run=body.dry_run
            )
    except DlqError as exc:
        raise Problem(503, str(exc)) from None
    return ReplayResult(counts=report.counts, outcomes=[_outcome(o) for o in report.outcomes])
