"""Billing use cases shared by the API and the CLI: a tenant's sign-up makes its Stripe customer; a
tenant subscribes to a plan, changes it, cancels it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
import stripe

from sensormine.audit import log as audit
from sensormine.billing.stripe_sync import ensure_customer, update_customer
from sensormine.billing.subscriptions import (
    IN_FORCE,
    NoSubscription,
    Subscription,
    check_subscription,
    end_subscription,
    get_subscription,
    price_of,
    record_subscription,
)
from sensormine.clients.postgres import METERING, connect
from sensormine.clients.stripe_api import make_stripe_client
from sensormine.settings import Settings
from sensormine.tenancy.tenants import Tenant
from sensormine.tenancy.usecases import change_tenant, register_tenant

log = logging.getLogger(__name__)


T = TypeVar("T")


def _at_stripe(
    settings: Settings,
    tenant_id: str,
    failed: str,
    step: Callable[[psycopg.Connection, stripe.StripeClient], T],
    fix: str = "sensormine billing sync-customers",
) -> T | None:
    """`step` as the metering role when billing is configured. Best effort: a failure is logged as "tenant
    <id> <failed>" with the command (`fix`) that finishes the work once Stripe answers."""
    if not settings.stripe_api_key:
        return None
    try:
        with connect(settings, role=METERING) as conn:
            return step(conn, make_stripe_client(settings))
    except (stripe.StripeError, psycopg.Error) as exc:
        log.warning("tenant %s %s (%s: %s); `%s` does it once Stripe answers",
                    tenant_id, failed, type(exc).__name__, exc, fix)  # fmt: skip
        return None


def provision_customer(settings: Settings, tenant_id: str) -> str | None:
    """The tenant's Stripe customer, made now if billing is configured (`stripe_api_key`); its id.

    Best effort, after the tenant's commit: a tenant never fails to exist because Stripe is down.
    None when billing is not configured or Stripe failed (logged); `sensormine billing
    sync-customers` makes the missing ones later."""
    return _at_stripe(
        settings, tenant_id, "created without its Stripe customer", lambda c, s: ensure_customer(c, s, tenant_id)[0]
    )


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


def update_tenant(
    conn: psycopg.Connection, actor: audit.Actor, settings: Settings, tenant_id: str, **changes: Any
) -> dict[str, Any]:
    """`change_tenant` (same keyword arguments and errors), then a new name sent to the tenant's Stripe customer
    (best effort, after the commit)."""
    changed = change_tenant(conn, actor, tenant_id, **changes)
    if "name" in changed:
        _at_stripe(
            settings, tenant_id, "renamed here but not yet at Stripe", lambda c, s: update_customer(c, s, tenant_id),
            fix="sensormine billing sync-customers --update",
        )  # fmt: skip
    return changed


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
        end_subscription(conn, tenant_id)
        audit.record(
            conn, actor, tenant_id, "billing.subscription.cancel", "subscription", current.stripe_subscription_id,
            {"plan": current.plan, "status": canceled.status},
        )  # fmt: skip
