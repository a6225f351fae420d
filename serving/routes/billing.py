"""Billing: a tenant's subscription at Stripe (see it, subscribe or change plan, cancel), its invoices, and
the endpoint Stripe's webhooks are sent to (docs/billing.md; notices are tenant events, /api/usage/events)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import stripe
from fastapi import APIRouter, Header, Query, Request, Response, Security
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sensormine.billing import chargeback, payment_methods, usecases, webhooks
from sensormine.billing.invoice_preview import preview_month
from sensormine.billing.payment_methods import PaymentMethod
from sensormine.billing.subscriptions import CatalogMissing, NoSubscription, SubscriptionError, get_subscription
from sensormine.clients.stripe_api import BillingNotConfigured
from sensormine.metering.records import ADDITIVE
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


class PaymentOut(BaseModel):
    """Whether the tenant's invoices are paid."""

    status: Literal["paid", "past_due"]
    past_due_since: datetime | None
    grace_until: datetime | None = Field(description="Past due: the free plan's limits apply from then until paid")
    invoice_id: str | None


class BillingOut(BaseModel):
    """The plan that applies to a tenant, its subscription (null: none of its own) and payment state."""

    tenant_id: str
    plan: str = Field(description="The plan in force (its own, or inherited; free once a payment's grace is over)")
    subscription: SubscriptionOut | None
    payment: PaymentOut | None = Field(description="Null: no invoice event seen yet")


class UsageDayOut(BaseModel):
    """One resource's usage on one UTC day, as the daily rollup (`usage_daily` asset) counted it."""

    day: date
    resource: str
    quantity: Decimal
    unit: str


class UsageOut(BaseModel):
    """Daily usage of a tenant over a period, and the period's totals of the additive resources."""

    tenant_id: str
    start: date
    end: date = Field(description="Exclusive")
    days: list[UsageDayOut]
    totals: dict[str, Decimal] = Field(
        description="Sums over the period of api_calls, ml_inference and readings (active devices and storage "
        "are per day: a device active on two days is one device, storage is held, not added up)"
    )


class PreviewOut(BaseModel):
    """What the month will cost so far: the plan's price and each resource's overage (USD)."""

    tenant_id: str
    month: str = Field(description="YYYY-MM")
    plan: str
    currency: str
    total: Decimal | None = Field(description="The sum of the lines' amounts; null: priced per contract")
    lines: list[dict[str, Any]]


class PolicyIn(BaseModel):
    """How the invoice is allocated to the sub-tenants that share the plan."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["direct", "proportional_devices", "proportional_readings", "fixed_percent", "fixed_amount",
                      "showback"]  # fmt: skip
    shares: dict[str, Decimal] = Field(
        default_factory=dict, description="fixed_percent: percent per tenant; fixed_amount: USD per tenant"
    )


class PolicyOut(BaseModel):
    """The allocation policy in force (direct when none was chosen)."""

    tenant_id: str
    strategy: str
    shares: dict[str, Decimal]


class AllocationOut(BaseModel):
    """One tenant's part of the invoice."""

    tenant_id: str
    amount: Decimal
    basis: str


class AllocationsOut(BaseModel):
    """A month's invoice (preview) of a paying tenant allocated to it and its sub-tenants; adds up to the cent."""

    tenant_id: str
    month: str
    strategy: str
    billed: bool = Field(description="false for showback: reported, the payer pays all")
    currency: str
    total: Decimal
    allocations: list[AllocationOut]


class SetupIntentOut(BaseModel):
    """What Stripe Elements needs to collect a card for the tenant (confirm it, then POST the payment method)."""

    setup_intent_id: str
    client_secret: str


class PaymentMethodIn(BaseModel):
    """A payment method collected by Stripe (a confirmed SetupIntent's `payment_method`)."""

    model_config = ConfigDict(extra="forbid")

    payment_method: str = Field(pattern=r"^pm_[A-Za-z0-9_]{1,200}$")
    default: bool = Field(True, description="Make it the one invoices charge")


class InvoiceOut(BaseModel):
    """An invoice as Stripe last told (amounts in the currency's smallest unit, e.g. cents)."""

    stripe_invoice_id: str
    number: str | None
    status: str
    currency: str
    amount_due: int
    amount_paid: int
    period_start: datetime | None
    period_end: datetime | None
    hosted_invoice_url: str | None
    created_at: datetime


class WebhookOut(BaseModel):
    """What a Stripe event did here."""

    event_id: str
    type: str
    outcome: str = Field(description="applied, stale (older than one applied), recorded, or `ignored: <why>`")
    duplicate: bool = Field(description="The event was delivered before; nothing changed this time")


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
        payment = conn.execute(
            "SELECT status, past_due_since, grace_until, invoice_id FROM tenant_payment_status WHERE tenant_id = %s",
            (tenant,),
        ).fetchone()
    config = effective_config(conn, tenant)
    conn.commit()
    assert config is not None  # caller.tenant found it
    return BillingOut(
        tenant_id=tenant,
        plan=config.plan,
        subscription=_sub_out(sub) if sub else None,
        payment=PaymentOut(**dict(zip(PaymentOut.model_fields, payment, strict=True))) if payment else None,
    )


Limit = Annotated[int, Query(ge=1, le=500)]


@router.get("/invoices", response_model=list[InvoiceOut])
def list_invoices(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None, limit: Limit = 50) -> list[InvoiceOut]:
    """The tenant's invoices, newest first."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        rows = conn.execute(
            "SELECT stripe_invoice_id, number, status, currency, amount_due, amount_paid, period_start, period_end, "
            "hosted_invoice_url, stripe_created FROM tenant_invoices WHERE tenant_id = %s "
            "ORDER BY stripe_created DESC, stripe_invoice_id LIMIT %s",
            (tenant, limit),
        ).fetchall()
    return [InvoiceOut(**dict(zip(InvoiceOut.model_fields, r, strict=True))) for r in rows]


@router.get("/usage", response_model=UsageOut, responses={422: {}})
def read_usage(
    caller: Reader,
    conn: ConnDep,
    start: Annotated[date, Query(description="First day (UTC)")],
    end: Annotated[date, Query(description="Day after the last (UTC), at most 366 days after start")],
    tenant_id: TenantParam = None,
) -> UsageOut:
    """The tenant's metered usage per day and resource, as rolled up daily (docs/billing.md)."""
    if not (start < end and (end - start).days <= 366):
        raise Problem(422, "end must be after start, and at most 366 days after it")
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        rows = conn.execute(
            "SELECT day, resource, quantity, unit FROM usage_daily WHERE tenant_id = %s AND day >= %s AND day < %s "
            "ORDER BY day, resource",
            (tenant, start, end),
        ).fetchall()
    days = [UsageDayOut(day=d, resource=r, quantity=q, unit=u) for d, r, q, u in rows]
    totals = {r: sum((d.quantity for d in days if d.resource == r), Decimal(0)) for r in ADDITIVE}
    return UsageOut(tenant_id=tenant, start=start, end=end, days=days, totals=totals)


def _month(month: str) -> date:
    try:
        return date.fromisoformat(f"{month}-01")
    except ValueError:
        raise Problem(422, f"month {month!r} is not a calendar month (YYYY-MM)") from None


MonthParam = Annotated[str, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")]


@router.get("/invoice-preview", response_model=PreviewOut, responses={422: {}})
def read_invoice_preview(
    caller: Reader,
    conn: ConnDep,
    month: MonthParam,
    tenant_id: TenantParam = None,
) -> PreviewOut:
    """The month's invoice preview from its monthly usage rollup (`usage_monthly`, refreshed daily)."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        preview = preview_month(conn, tenant, _month(month))
    return PreviewOut(
        tenant_id=tenant, month=month, plan=preview.plan, currency=preview.currency, total=preview.total,
        lines=preview.lines,
    )  # fmt: skip


@router.get("/allocation-policy", response_model=PolicyOut)
def read_allocation_policy(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> PolicyOut:
    """How the tenant allocates its invoice to the sub-tenants sharing its plan."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        strategy, shares = chargeback.get_policy(conn, tenant)
    return PolicyOut(tenant_id=tenant, strategy=strategy, shares=shares)


@router.put("/allocation-policy", response_model=PolicyOut, responses={422: {}})
def put_allocation_policy(body: PolicyIn, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> PolicyOut:
    """Choose the allocation strategy (and the fixed shares); audited."""
    tenant = caller.tenant(tenant_id)
    conn.commit()
    try:
        shares = chargeback.set_policy(conn, caller, tenant, body.strategy, body.shares)
    except chargeback.ChargebackError as exc:
        raise Problem(422, str(exc)) from None
    return PolicyOut(tenant_id=tenant, strategy=body.strategy, shares=shares)


@router.get(
    "/allocations",
    response_model=AllocationsOut,
    responses={200: {"content": {"text/csv": {}}}, 409: {}, 422: {}},
)
def read_allocations(
    caller: Reader,
    conn: ConnDep,
    month: MonthParam,
    tenant_id: TenantParam = None,
    format: Annotated[Literal["json", "csv"], Query(description="csv: one row per tenant and a total row")] = "json",
) -> Any:
    """The month's invoice preview allocated to the tenant and its sub-tenants by its policy."""
    tenant = caller.tenant(tenant_id)
    first = _month(month)
    try:
        with caller.scope(conn):
            report = chargeback.allocation_report(conn, tenant, first)
    except chargeback.ChargebackError as exc:
        raise Problem(409, str(exc)) from None
    if format == "csv":
        name = f"allocations-{tenant}-{month}.csv"
        return Response(chargeback.report_csv(report), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip
    return AllocationsOut(
        tenant_id=tenant, month=month, strategy=report.strategy, billed=report.billed, currency=report.currency,
        total=report.total, allocations=[AllocationOut(**vars(a)) for a in report.allocations],
    )  # fmt: skip


@router.post("/setup-intent", response_model=SetupIntentOut, responses={502: {}, 503: {}})
def create_setup_intent(
    caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> SetupIntentOut:
    """Start collecting a card with Stripe Elements (the tenant's customer is made first if needed)."""
    tenant = caller.tenant(tenant_id)
    conn.commit()
    try:
        intent_id, secret = payment_methods.start_setup(settings, tenant)
    except (BillingNotConfigured, stripe.StripeError) as exc:
        raise _problem(exc) from None
    return SetupIntentOut(setup_intent_id=intent_id, client_secret=secret)


@router.get("/payment-methods", response_model=list[PaymentMethod])
def read_payment_methods(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> list[PaymentMethod]:
    """The tenant's payment methods, the default first."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        methods = payment_methods.list_payment_methods(conn, tenant)
    return methods


@router.post("/payment-methods", response_model=PaymentMethod, status_code=201, responses={502: {}, 503: {}})
def add_payment_method(
    body: PaymentMethodIn, caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> PaymentMethod:
    """Attach a payment method to the tenant's customer (by default the one invoices charge); audited."""
    tenant = caller.tenant(tenant_id)
    conn.commit()
    try:
        added = payment_methods.add_payment_method(conn, caller, settings, tenant, body.payment_method, body.default)
    except (BillingNotConfigured, stripe.StripeError) as exc:
        raise _problem(exc) from None
    return added


@router.delete("/payment-methods/{payment_method_id}", status_code=204, responses={404: {}, 502: {}, 503: {}})
def delete_payment_method(
    payment_method_id: str, caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> Response:
    """Detach a payment method at Stripe and forget it; audited."""
    tenant = caller.tenant(tenant_id)
    conn.commit()
    try:
        payment_methods.remove_payment_method(conn, caller, settings, tenant, payment_method_id)
    except payment_methods.UnknownPaymentMethod as exc:
        raise Problem(404, str(exc)) from None
    except (BillingNotConfigured, stripe.StripeError) as exc:
        raise _problem(exc) from None
    return Response(status_code=204)


@router.post("/webhooks/stripe", response_model=WebhookOut, responses={400: {}, 503: {}})
async def stripe_webhook(
    request: Request,
    settings: SettingsDep,
    stripe_signature: Annotated[str | None, Header(description="Stripe's signature of the body")] = None,
) -> WebhookOut:
    """Stripe's events (no API key: the signature with the endpoint's secret is the credential), each applied once."""
    payload = await request.body()
    try:
        event = webhooks.verify_event(payload, stripe_signature, settings.stripe_webhook_secret)
    except webhooks.WebhooksNotConfigured as exc:
        raise Problem(503, str(exc)) from None
    except webhooks.BadWebhook as exc:
        raise Problem(400, str(exc)) from None
    result = await run_in_threadpool(webhooks.handle_event, settings, event)
    if result.outcome == "applied" and not result.duplicate:
        credential_cache(request).clear()  # cached callers carry their tenant's plan
    return WebhookOut(event_id=result.event_id, type=result.type, outcome=result.outcome, duplicate=result.duplicate)


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
