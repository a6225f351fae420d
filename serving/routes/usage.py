"""Usage of a tenant against its plan (API calls, devices, ML inferences) and the events its admins should hear of."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Security
from pydantic import BaseModel, Field

from sensormine.limits.quotas import Quotas
from sensormine.metering.calendar import month_label
from sensormine.metering.events import tenant_events
from sensormine.metering.reports import month_usage
from sensormine.tenancy.plans import get_plan
from serving.deps import Caller, ConnDep, authenticate
from serving.pagination import Page, PageDep
from serving.problems import Problem

router = APIRouter(prefix="/api/usage", tags=["usage"])
Reader = Annotated[Caller, Security(authenticate, scopes=["usage:read"])]
TenantParam = Annotated[str | None, Query(description="A sub-tenant; the caller's own tenant by default")]


class Allowance(BaseModel):
    """Used against the plan's limit (null: unlimited)."""

    used: int
    limit: int | None


class DayCount(BaseModel):
    """Metered counts of one day."""

    day: date
    api_calls: int
    ml_inference: int = Field(description="Readings scored by an anomaly model")


class TenantCount(BaseModel):
    """Metered counts and devices of one tenant of the subtree in the month (for chargeback)."""

    tenant_id: str
    api_calls: int
    ml_inference: int
    devices: int


class UsageOut(BaseModel):
    """A tenant's month: its quota group's standing against the plan, and its own subtree's breakdown."""

    tenant_id: str
    month: str = Field(description="YYYY-MM (UTC)")
    plan: str
    quota_tenant: str = Field(description="Whose plan and quota apply (the nearest tenant up with its own plan)")
    api_calls: Allowance = Field(description="The quota group's calls this month (live for the current month)")
    devices: Allowance = Field(description="The quota group's registered devices")
    ml_inference: Allowance = Field(
        description="The quota group's readings scored by anomaly models this month (stream, batch and dry runs); "
        "metered for billing, limited by no plan yet"
    )
    by_day: list[DayCount] = Field(description="The tenant's own counts per day with any (flushed counts)")
    by_tenant: list[TenantCount] = Field(description="The tenant and each sub-tenant (flushed counts)")


class EventOut(BaseModel):
    """Something that happened to a tenant (e.g. quota.api_calls.warning at 80 %)."""

    id: int
    at: datetime
    tenant_id: str
    type: str
    data: dict[str, Any]


def _month(month: str | None) -> tuple[datetime, str]:
    """The month's first instant (UTC) and its label."""
    if month is None:
        month = month_label(datetime.now(UTC))
    try:
        first = date.fromisoformat(month + "-01")
    except ValueError:
        raise Problem(422, f"month {month!r} is not YYYY-MM, e.g. 2026-11") from None
    return datetime(first.year, first.month, 1, tzinfo=UTC), month


@router.get("", response_model=UsageOut)
def usage(
    caller: Reader,
    conn: ConnDep,
    request: Request,
    tenant_id: TenantParam = None,
    month: Annotated[str | None, Query(description="YYYY-MM; the current month by default")] = None,
) -> UsageOut:
    """API calls and devices against the plan, per day and per sub-tenant."""
    tenant = caller.tenant(tenant_id)
    first, label = _month(month)
    with caller.scope(conn):
        used_in_month = month_usage(conn, tenant, first)
    used = used_in_month.group.api_calls
    quotas: Quotas | None = getattr(request.app.state, "quotas", None)
    if quotas is not None and label == month_label(datetime.now(UTC)):
        live = quotas.backend.month_count(used_in_month.quota_tenant, label)
        used = max(used, live or 0)  # the live counter includes calls not flushed yet
    plan = get_plan(used_in_month.plan)
    return UsageOut(
        tenant_id=tenant,
        month=label,
        plan=plan.name,
        quota_tenant=used_in_month.quota_tenant,
        api_calls=Allowance(used=used, limit=plan.api_calls_per_month),
        devices=Allowance(used=used_in_month.group_devices, limit=plan.max_devices),
        ml_inference=Allowance(used=used_in_month.group.ml_inference, limit=None),
        by_day=[DayCount(day=d, **vars(c)) for d, c in used_in_month.by_day],
        by_tenant=[TenantCount(tenant_id=t, devices=n, **vars(c)) for t, c, n in used_in_month.by_tenant],
    )


@router.get("/events", response_model=Page[EventOut])
def events(caller: Reader, conn: ConnDep, page: PageDep, tenant_id: TenantParam = None) -> dict[str, Any]:
    """Events of a tenant, newest first: quota warnings and refusals, billing notices (trial ending, payment
    failed or recovered, subscription ended; data: severity, message, and to whom it was mailed)."""
    tenant = caller.tenant(tenant_id)
    if page.after is not None and not isinstance(page.after, int):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    with caller.scope(conn):
        rows = tenant_events(conn, tenant, page.after, page.limit + 1)
    items = [EventOut(**vars(e)) for e in rows]
    return page.page(items, key=lambda e: e.id)
