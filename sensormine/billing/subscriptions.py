"""A tenant's subscription at Stripe, as recorded here (`tenant_subscriptions`, migration 025).

Pro is sold by subscription (monthly or yearly, the catalogue's prices); Free needs none (cancel the
subscription to return to it) and Enterprise is priced per contract (a platform administrator sets
that plan). The plan the platform applies (`tenants.plan`) follows the subscription while Stripe
says it is active or trialing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

SUBSCRIBABLE = {"pro"}
INTERVALS = ("month", "year")
IN_FORCE = ("active", "trialing")


class SubscriptionError(ValueError):
    """A subscription that cannot be had as asked (the message says what instead)."""


class NoSubscription(LookupError):
    """The tenant has no subscription."""


class CatalogMissing(RuntimeError):
    """The plan's price is not at Stripe yet."""


@dataclass(frozen=True)
class Subscription:
    """A recorded subscription."""

    tenant_id: str
    stripe_subscription_id: str
    stripe_item_id: str
    plan: str
    interval: str
    status: str
    created_at: datetime | None = None
    updated_at: datetime | None = None


def check_subscription(plan: str, interval: str) -> None:
    """Refuse what is not sold by subscription (SubscriptionError saying what to do instead)."""
    if plan == "free":
        raise SubscriptionError("the free plan needs no subscription: cancel the current one to return to it")
    if plan == "enterprise":
        raise SubscriptionError("enterprise is priced per contract: a platform administrator sets that plan")
    if plan not in SUBSCRIBABLE:
        raise SubscriptionError(f"plan {plan!r}: subscribe to one of {', '.join(sorted(SUBSCRIBABLE))}")
    if interval not in INTERVALS:
        raise SubscriptionError(f"interval {interval!r}: one of {', '.join(INTERVALS)}")


def get_subscription(conn: psycopg.Connection, tenant_id: str) -> Subscription | None:
    """The tenant's recorded subscription, if any (caller's scope)."""
    row = conn.execute(
        "SELECT tenant_id, stripe_subscription_id, stripe_item_id, plan, billing_interval, status, created_at, "
        "updated_at FROM tenant_subscriptions WHERE tenant_id = %s",
        (tenant_id,),
    ).fetchone()
    return Subscription(*row) if row else None


def price_of(conn: psycopg.Connection, plan: str, interval: str) -> str:
    """The Stripe price id of a plan and interval (metering role; CatalogMissing before `sync-catalog`)."""
    row = conn.execute("SELECT stripe_id FROM stripe_catalog WHERE key = %s", (f"price:{plan}:{interval}",)).fetchone()
    conn.commit()
    if row is None:
        raise CatalogMissing(
            f"the {plan} plan's {interval}ly price is not at Stripe yet: run `sensormine billing sync-catalog`"
        )
    return str(row[0])


def record_subscription(conn: psycopg.Connection, sub: Subscription) -> Subscription:
    """Insert or replace the tenant's subscription row (caller's transaction, writer scope)."""
    row = conn.execute(
        "INSERT INTO tenant_subscriptions (tenant_id, stripe_subscription_id, stripe_item_id, plan, billing_interval, "
        "status) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE SET "
        "stripe_subscription_id = excluded.stripe_subscription_id, stripe_item_id = excluded.stripe_item_id, "
        "plan = excluded.plan, billing_interval = excluded.billing_interval, status = excluded.status, "
        "updated_at = now() RETURNING created_at, updated_at",
        (sub.tenant_id, sub.stripe_subscription_id, sub.stripe_item_id, sub.plan, sub.interval, sub.status),
    ).fetchone()
    assert row is not None
    return Subscription(
        sub.tenant_id, sub.stripe_subscription_id, sub.stripe_item_id, sub.plan, sub.interval, sub.status, *row
    )


def end_subscription(conn: psycopg.Connection, tenant_id: str) -> None:
    """Forget the tenant's subscription: a top-level tenant returns to the free plan, a sub-tenant to its
    parent's (caller's transaction and role)."""
    conn.execute("DELETE FROM tenant_subscriptions WHERE tenant_id = %s", (tenant_id,))
    conn.execute(
        "UPDATE tenants SET plan = CASE WHEN parent_id IS NULL THEN 'free' END, updated_at = now() WHERE id = %s",
        (tenant_id,),
    )
