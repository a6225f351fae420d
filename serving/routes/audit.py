"""The audit log: who changed what in your tenant and its sub-tenants, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Security
from pydantic import BaseModel

from sensormine.audit.log import query_audit
from sensormine.tenancy.tenants import visible_tenant_ids
from serving.deps import Caller, ConnDep, authenticate
from serving.pagination import Page, PageDep
from serving.problems import Problem

router = APIRouter(prefix="/api/audit", tags=["audit"])

Auditor = Annotated[Caller, Security(authenticate, scopes=["audit:read"])]


class AuditOut(BaseModel):
    """One recorded change."""

    id: int
    at: datetime
    tenant_id: str | None
    actor: str
    actor_role: str | None
    action: str
    target_type: str
    target_id: str
    detail: dict[str, Any]


@router.get("", response_model=Page[AuditOut])
def list_entries(
    caller: Auditor,
    conn: ConnDep,
    page: PageDep,
    tenant_id: Annotated[
        str | None, Query(description="Only this tenant and its sub-tenants (default: all of yours)")
    ] = None,
    action: Annotated[
        str | None, Query(description="An action (tenant.update) or a prefix of actions (tenant)", max_length=100)
    ] = None,
    actor: Annotated[str | None, Query(description="user:<id>, key:<id> or cli", max_length=200)] = None,
    since: Annotated[datetime | None, Query(description="Entries at or after this time (ISO-8601)")] = None,
) -> dict[str, Any]:
    """Changes to your tenant and its sub-tenants, newest first; `next_cursor` pages back in time."""
    if page.after is not None and not isinstance(page.after, int):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    if tenant_id is None:
        tenants = list(caller.visible)
    else:
        caller.tenant(tenant_id)
        with caller.scope(conn):
            tenants = [t for t in visible_tenant_ids(conn, tenant_id) if t in caller.visible]
    with caller.scope(conn):
        entries = query_audit(
            conn,
            tenants,
            action=action,
            actor=actor,
            since=since,
            before_id=page.after,
            limit=page.limit + 1,
            include_platform=caller.is_platform and tenant_id is None,
        )
    return page.page([AuditOut(**vars(e)) for e in entries], key=lambda e: e.id)
