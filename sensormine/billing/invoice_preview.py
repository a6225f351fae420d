"""What a tenant's month will cost: the plan's price and the overage of each metered resource.

Prices are Decimal dollars (USD, the catalogue's currency). Overage is charged per started unit
block beyond the plan's allowance (e.g. 1,000 API calls) and rounded half-up to the cent per line;
the total is the sum of the lines, so it always equals what the lines say. The free plan has hard
limits instead of overage; enterprise is priced per contract (the preview lists usage, no amounts).
A yearly Pro subscription shows a twelfth of its yearly price as the month's share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sensormine.billing.stripe_sync import CURRENCY, PRICES
from sensormine.metering.records import (
    ACTIVE_DEVICES,
    API_CALLS,
    DATA_EGRESS,
    DATA_INGESTED,
    ML_INFERENCE,
    STORAGE_MONTH,
)
from sensormine.tenancy.config import effective_config

CENT = Decimal("0.01")
GB = 10**9


@dataclass(frozen=True)
class Overage:
    """Beyond `included` units of a resource, `price` for every started block of `per` units."""

    resource: str
    included: Decimal
    per: Decimal
    price: Decimal

    def charge(self, used: Decimal) -> tuple[Decimal, Decimal]:
        """(units beyond the allowance, their charge rounded to the cent)."""
        beyond = max(Decimal(0), used - self.included)
        blocks = Decimal(math.ceil(beyond / self.per)) if beyond else Decimal(0)
        return beyond, (blocks * self.price).quantize(CENT, ROUND_HALF_UP)


# The Pro plan's allowances are its limits (tenancy/plans.py); beyond them, these prices.
OVERAGE: dict[str, tuple[Overage, ...]] = {
    "pro": (
        Overage(API_CALLS, Decimal(1_000_000), Decimal(1_000), Decimal("0.50")),
        Overage(ACTIVE_DEVICES, Decimal(100), Decimal(1), Decimal("1.00")),
        Overage(STORAGE_MONTH, Decimal(50), Decimal(1), Decimal("0.10")),
        Overage(ML_INFERENCE, Decimal(0), Decimal(1_000), Decimal("0.20")),
        # Bytes, priced per started GB (10^9 bytes) beyond an allowance of our own choosing.
        Overage(DATA_INGESTED, Decimal(100 * GB), Decimal(GB), Decimal("0.05")),
        Overage(DATA_EGRESS, Decimal(50 * GB), Decimal(GB), Decimal("0.09")),
    ),
}


@dataclass(frozen=True)
class Preview:
    """The month's lines and their total (None for a plan priced per contract)."""

    tenant_id: str
    month: date
    plan: str
    currency: str
    total: Decimal | None
    lines: list[dict[str, Any]]


def _base_price(plan: str, interval: str | None) -> tuple[Decimal, str]:
    prices = {(p.plan, p.interval): p.amount for p in PRICES}
    if interval == "year" and (plan, "year") in prices:
        return (prices[(plan, "year")] / 12).quantize(CENT, ROUND_HALF_UP), f"{plan} plan, a twelfth of the year"
    return prices.get((plan, "month"), Decimal(0)), f"{plan} plan, monthly"


def build_preview(tenant_id: str, month: date, plan: str, interval: str | None, usage: dict[str, Decimal]) -> Preview:
    """The preview of a month's usage on `plan` (pure: the lines add up to the total)."""
    if plan == "enterprise":
        listed: list[dict[str, Any]] = [
            {"item": "usage", "resource": r, "used": str(q), "amount": None} for r, q in sorted(usage.items())
        ]
        return Preview(tenant_id, month, plan, CURRENCY, None, listed)
    base, label = _base_price(plan, interval)
    lines: list[dict[str, Any]] = [{"item": "plan", "description": label, "amount": str(base)}]
    total = base
    for rule in OVERAGE.get(plan, ()):
        used = usage.get(rule.resource, Decimal(0))
        beyond, amount = rule.charge(used)
        lines.append({
            "item": "overage", "resource": rule.resource, "used": str(used), "included": str(rule.included),
            "beyond": str(beyond), "unit_price": str(rule.price), "per": str(rule.per), "amount": str(amount),
        })  # fmt: skip
        total += amount
    return Preview(tenant_id, month, plan, CURRENCY, total, lines)


def quota_members(conn: psycopg.Connection, tenant_id: str) -> list[str]:
    """The tenant and the sub-tenants that share its plan (and its invoice), by id."""
    return sorted(r[0] for r in conn.execute("SELECT sensormine_quota_group(%s)", (tenant_id,)).fetchall())


def member_usage(conn: psycopg.Connection, members: list[str], month: date) -> dict[str, dict[str, Decimal]]:
    """Each member's `usage_monthly` of the month: tenant -> resource -> quantity."""
    usage: dict[str, dict[str, Decimal]] = {m: {} for m in members}
    for tenant, resource, quantity in conn.execute(
        "SELECT tenant_id, resource, quantity FROM usage_monthly WHERE tenant_id = ANY(%s) AND month = %s",
        (members, month),
    ).fetchall():
        usage[tenant][resource] = quantity
    return usage


def preview_month(conn: psycopg.Connection, tenant_id: str, month: date) -> Preview:
    """The month's preview of the tenant's invoice (caller's role and transaction; the asset and the API both
    call it): the plan in force, priced on the `usage_monthly` of the tenant and of the sub-tenants sharing
    its plan (one invoice). A sub-tenant billed to an ancestor gets a preview without a total naming it.
    The plan applied is today's: a plan change within the month is not prorated here."""
    config = effective_config(conn, tenant_id)
    plan = config.plan if config else "free"
    if config is not None and config.plan_from != tenant_id:
        lines: list[dict[str, Any]] = [{"item": "billed_to", "tenant_id": config.plan_from, "amount": None}]
        return Preview(tenant_id, month, plan, CURRENCY, None, lines)
    usage: dict[str, Decimal] = {}
    for used in member_usage(conn, quota_members(conn, tenant_id), month).values():
        for resource, quantity in used.items():
            usage[resource] = usage.get(resource, Decimal(0)) + quantity
    sub = conn.execute(
        "SELECT billing_interval FROM tenant_subscriptions WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    return build_preview(tenant_id, month, plan, sub[0] if sub else None, usage)


def record_preview(conn: psycopg.Connection, preview: Preview) -> None:
    """Replace the month's stored preview (caller's transaction, metering role)."""
    conn.execute(
        "INSERT INTO invoice_previews (tenant_id, month, plan, currency, total, lines) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (tenant_id, month) DO UPDATE SET plan = excluded.plan, currency = excluded.currency, "
        "total = excluded.total, lines = excluded.lines, computed_at = now()",
        (preview.tenant_id, preview.month, preview.plan, preview.currency, preview.total, Jsonb(preview.lines)),
    )
