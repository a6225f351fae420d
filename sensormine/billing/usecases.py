"""Billing use cases shared by the API and the CLI: a tenant's sign-up makes its Stripe customer; a
tenant subscribes to a plan, changes it, cancels it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec

import psycopg
import stripe

from sensormine.audit import log as audit
from sensormine.billing.stripe_sync import ensure_customer
from sensormine.billing.subscriptions import (
    IN_FORCE,
    NoSubscription,
    Subscription,
    check_subscription,
    get_subscription,
    price_of,
    record_subscription,
)
from sensormine.clients.postgres import METERING, connect
from sensormine.clients.stripe_api import make_stripe_client
from sensormine.settings import Settings
from sensormine.tenancy.tenants import Tenant
from sensormine.tenancy.usecases import register_tenant

log = logging.getLogger(__name__)


def provision_customer(settings: Settings, tenant_id: str) -> str | None:
    """The tenant's Stripe customer, made now if billing is configured (`stripe_api_key`); its id.

    Best effort, after the tenant's commit: a tenant never fails to exist because Stripe is down.
    None when billing is not configured or Stripe failed (logged); `sensormine billing
    sync-customers` makes the missing ones later."""
    if not settings.stripe_api_key:
        return None
    try:
        with connect(settings, role=METERING) as conn:
            customer_id, _ = ensure_customer(conn, make_stripe_client(settings), tenant_id)
    except (stripe.StripeError, psycopg.Error) as exc:
        log.warning(
            "tenant %s created without its Stripe customer (%s: %s); `sensormine billing sync-customers` "
            "makes it once Stripe answers",
            tenant_id,
            type(exc).__name__,
            exc,
        )
        return None
    return customer_id


P = ParamSpec("P")
Register = Callable[Concatenate[psycopg.Connection, audit.Actor, Settings, str, P], Tenant]


def _then_customer(register: Register[P]) -> Register[P]:
    def sign_up(
        conn: psycopg.Connection, actor: audit.Actor, settings: Settings, tenant_id: str, *a: P.args, **kw: P.kwargs
    ) -> Tenant:
        tenant = register(conn, actor, settings, tenant_id, *a, **kw)
        provision_customer(settings, tenant_id)
        return tenant

    sign_up.__doc__ = "`register_tenant` (same arguments and errors), then the tenant's Stripe customer."
    return sign_up


sign_up_tenant = _then_customer(register_tenant)


def subscribe(
    conn: psycopg.Connection, actor: audit.Actor, settings: Settings, tenant_id: str, plan: str, interval: str
) -> Subscription:
    """Subscribe the tenant to a plan, or change its subscription's plan or interval (Stripe prorates).

    Makes the tenant's customer first if it has none. The tenant's plan follows when Stripe answers
    that the subscription is active or trialing. Raises SubscriptionError, CatalogMissing,
    BillingNotConfigured, stripe.StripeError."""
    check_subscription(plan, interval)
    client = make_stripe_client(settings)
    with connect(settings, role=METERING) as billing:
        customer_id, _ = ensure_customer(billing, client, tenant_id)
        price = price_of(billing, plan, interval)
    with actor.scope(conn):
        current = get_subscription(conn, tenant_id)
    metadata = {"tenant_id": tenant_id, "plan": plan}
    if current is None:
        made = client.v1.subscriptions.create(
            {"customer": customer_id, "items": [{"price": price}], "metadata": metadata}
        )
    else:
        made = client.v1.subscriptions.update(
            current.stripe_subscription_id,
            {
                "items": [{"id": current.stripe_item_id, "price": price}],
                "proration_behavior": "create_prorations",
                "metadata": metadata,
            },
        )
    sub = Subscription(tenant_id, made.id, made["items"].data[0].id, plan, interval, made.status)
    with actor.scope(conn, write=True):
        sub = record_subscription(conn, sub)
        if sub.status in IN_FORCE:
            conn.execute("UPDATE tenants SET plan = %s WHERE id = %s", (plan, tenant_id))
        action = "billing.subscription.create" if current is None else "billing.subscription.change"
        detail: dict[str, Any] = {"plan": plan, "interval": interval, "status": sub.status}
        if current is not None:
            detail["from"] = {"plan": current.plan, "interval": current.interval}
        audit.record(conn, actor, tenant_id, action, "subscription", sub.stripe_subscription_id, detail)
    return sub


def cancel_subscription(conn: psycopg.Connection, actor: audit.Actor, settings: Settings, tenant_id: str) -> None:
    """Cancel the tenant's subscription at once: a top-level tenant returns to the free plan, a sub-tenant
    to its parent's. Raises NoSubscription, BillingNotConfigured, stripe.StripeError."""
    with actor.scope(conn):
        current = get_subscription(conn, tenant_id)
    if current is None:
        raise NoSubscription(f"tenant {tenant_id!r} has no subscription")
    canceled = make_stripe_client(settings).v1.subscriptions.cancel(current.stripe_subscription_id)
    with actor.scope(conn, write=True):
        conn.execute("DELETE FROM tenant_subscriptions WHERE tenant_id = %s", (tenant_id,))
        conn.execute(
            "UPDATE tenants SET plan = CASE WHEN parent_id IS NULL THEN 'free' END WHERE id = %s", (tenant_id,)
        )
        audit.record(
            conn, actor, tenant_id, "billing.subscription.cancel", "subscription", current.stripe_subscription_id,
            {"plan": current.plan, "status": canceled.status},
        )  # fmt: skip
