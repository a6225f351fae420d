"""A tenant's subscription at Stripe: see it, subscribe or change plan (prorated), cancel (docs/billing.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import stripe
from fastapi import APIRouter, Query, Request, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from sensormine.billing import usecases
from sensormine.billing.subscriptions import CatalogMissing, NoSubscription, SubscriptionError, get_subscription
from sensormine.clients.stripe_api import BillingNotConfigured
from sensormine.tenancy.config import effective_config
from serving.deps import Caller, ConnDep, SettingsDep, authenticate, credential_cache
from serving.problems import Problem

router = APIRouter(prefix="/api/billing", tags=["billing"])
Reader = Annotated[Caller, Security(authenticate, scopes=["billing:read"])]
Writer = Annotated[Caller, Security(authenticate, scopes=["billing:write"])]
TenantParam = Annotated[str | None, Query(description="A sub-tenant; the caller's own tenant by default")]


class SubscriptionIn(BaseModel):
    """The plan to pay for, and how often."""

    model_config = ConfigDict(extra="forbid")

    plan: Literal["pro"] = Field(description="Plans sold by subscription (free needs none; enterprise is by contract)")
    interval: Literal["month", "year"] = "month"


class SubscriptionOut(BaseModel):
    """A subscription as Stripe last answered."""

    stripe_subscription_id: str
    plan: str
    interval: str
    status: str
    created_at: datetime | None
    updated_at: datetime | None


class BillingOut(BaseModel):
    """The plan that applies to a tenant, and its subscription (null: none of its own)."""

    tenant_id: str
    plan: str = Field(description="The plan in force (its own, or inherited)")
    subscription: SubscriptionOut | None


def _problem(exc: Exception) -> Problem:
    if isinstance(exc, NoSubscription):
        return Problem(404, str(exc))
    if isinstance(exc, SubscriptionError):
        return Problem(422, str(exc))
    if isinstance(exc, CatalogMissing):
        return Problem(409, str(exc))
    if isinstance(exc, BillingNotConfigured):
        return Problem(503, str(exc))
    return Problem(502, f"Stripe refused or could not be reached ({type(exc).__name__}: {exc}); try again")


def _sub_out(sub: Any) -> SubscriptionOut:
    return SubscriptionOut(**{k: getattr(sub, k) for k in SubscriptionOut.model_fields})


@router.get("/subscription", response_model=BillingOut)
def read_subscription(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> BillingOut:
    """The tenant's plan and subscription."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        sub = get_subscription(conn, tenant)
    config = effective_config(conn, tenant)
    conn.commit()
    assert config is not None  # caller.tenant found it
    return BillingOut(tenant_id=tenant, plan=config.plan, subscription=_sub_out(sub) if sub else None)


@router.put("/subscription", response_model=SubscriptionOut, responses={409: {}, 422: {}, 502: {}, 503: {}})
def put_subscription(
    body: SubscriptionIn, caller: Writer, conn: ConnDep, settings: SettingsDep, request: Request,
    tenant_id: TenantParam = None,
) -> SubscriptionOut:  # fmt: skip
    """Subscribe to a plan, or change the plan or interval (Stripe prorates); the tenant's plan follows."""
    tenant = caller.tenant(tenant_id)
    conn.commit()
    try:
        sub = usecases.subscribe(conn, caller, settings, tenant, body.plan, body.interval)
    except (SubscriptionError, CatalogMissing, BillingNotConfigured, stripe.StripeError) as exc:
        raise _problem(exc) from None
    credential_cache(request).clear()  # cached callers carry their tenant's plan
    return _sub_out(sub)


@router.delete("/subscription", status_code=204, responses={404: {}, 502: {}, 503: {}})
def delete_subscription(
    caller: Writer, conn: ConnDep, settings: SettingsDep, request: Request, tenant_id: TenantParam = None
) -> Response:
    """Cancel the subscription at once: back to the free plan (a sub-tenant: to its parent's)."""
    tenant = caller.tenant(tenant_id)
    conn.commit()
    try:
        usecases.cancel_subscription(conn, caller, settings, tenant)
    except (NoSubscription, BillingNotConfigured, stripe.StripeError) as exc:
        raise _problem(exc) from None
    credential_cache(request).clear()
    return Response(status_code=204)
