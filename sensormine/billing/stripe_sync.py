"""What Sensormine keeps at Stripe, created once: the plan catalogue and a customer per tenant.

Each object is created with an idempotency key derived from what it is (`sensormine-product:pro`,
`sensormine-customer:acme`) and its id recorded in PostgreSQL in its own transaction
(`stripe_catalog`, `tenants.stripe_customer_id`), so a run that stops halfway is finished by the
next one, and a second run creates nothing. The recorded id is what prevents doubles: stripe-mock
ignores idempotency keys, and Stripe forgets them after 24 hours. Runs as `sensormine_metering`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import stripe
from psycopg.types.json import Jsonb
from stripe.params import CustomerCreateParams, CustomerUpdateParams, PriceCreateParams

CURRENCY = "usd"


@dataclass(frozen=True)
class PriceSpec:
    """A recurring price of a plan (Decimal money in the currency's unit)."""

    plan: str
    interval: str  # "month" or "year"
    amount: Decimal

    @property
    def key(self) -> str:
        """The catalogue key: price:<plan>:<interval>."""
        return f"price:{self.plan}:{self.interval}"

    @property
    def unit_amount(self) -> int:
        """In the currency's smallest unit (cents), as Stripe takes it."""
        return int((self.amount * 100).to_integral_value())


# The product design's tiers: Free $0, Pro $99 a month or $990 a year, Enterprise priced per contract.
PRODUCTS = {"free": "Sensormine Free", "pro": "Sensormine Pro", "enterprise": "Sensormine Enterprise"}
PRICES = (
    PriceSpec("free", "month", Decimal("0")),
    PriceSpec("pro", "month", Decimal("99")),
    PriceSpec("pro", "year", Decimal("990")),
)


# Usage sent to Stripe as meter events (sensormine.billing.usage_report): resource -> (event name, meter name).
METERS = {
    "api_calls": ("sensormine_api_calls", "Sensormine API calls"),
    "ml_inference": ("sensormine_ml_inference", "Sensormine ML inferences"),
    "data_ingested": ("sensormine_data_ingested", "Sensormine data ingested (bytes)"),
    "data_egress": ("sensormine_data_egress", "Sensormine data egress (bytes)"),
}


@dataclass
class SyncReport:
    """What a run created at Stripe and what was there already (catalogue keys or tenant ids)."""

    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def _idempotency(key: str) -> stripe.RequestOptions:
    return {"idempotency_key": f"sensormine-{key}"}


def sync_catalog(
    conn: psycopg.Connection, client: stripe.StripeClient, progress: Callable[[str], None] = lambda _: None
) -> SyncReport:
    """Create the plans' products and prices, and the usage meters, at Stripe unless recorded (`conn` idle)."""
    report = SyncReport()
    with conn.transaction():
        known: dict[str, str] = dict(conn.execute("SELECT key, stripe_id FROM stripe_catalog").fetchall())

    def record(key: str, stripe_id: str, detail: dict[str, Any]) -> None:
        with conn.transaction():
            conn.execute(
                "INSERT INTO stripe_catalog (key, stripe_id, detail) VALUES (%s, %s, %s)",
                (key, stripe_id, Jsonb(detail)),
            )
        known[key] = stripe_id
        report.created.append(key)
        progress(f"created {key}: {stripe_id}")

    for plan, name in PRODUCTS.items():
        key = f"product:{plan}"
        if key in known:
            report.kept.append(key)
            continue
        product = client.v1.products.create({"name": name, "metadata": {"plan": plan}}, _idempotency(key))
        record(key, product.id, {"name": name})
    for price in PRICES:
        if price.key in known:
            report.kept.append(price.key)
            continue
        params: PriceCreateParams = {
            "product": known[f"product:{price.plan}"],
            "currency": CURRENCY,
            "unit_amount": price.unit_amount,
            "recurring": {"interval": "month" if price.interval == "month" else "year"},
            "lookup_key": f"sensormine_{price.plan}_{price.interval}",
            "metadata": {"plan": price.plan},
        }
        made = client.v1.prices.create(params, _idempotency(price.key))
        record(price.key, made.id, {"amount": str(price.amount), "currency": CURRENCY, "interval": price.interval})
    for resource, (event_name, display_name) in METERS.items():
        key = f"meter:{resource}"
        if key in known:
            report.kept.append(key)
            continue
        meter = client.v1.billing.meters.create(
            {
                "display_name": display_name,
                "event_name": event_name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "value_settings": {"event_payload_key": "value"},
            },
            _idempotency(key),
        )
        record(key, meter.id, {"event_name": event_name})
    return report


def _customer_metadata(tenant_id: str, parent_id: str | None) -> dict[str, str]:
    return {"tenant_id": tenant_id, "parent_tenant_id": parent_id or ""}


def _tenant_row(conn: psycopg.Connection, tenant_id: str) -> tuple[str, str | None, str | None]:
    with conn.transaction():
        row = conn.execute(
            "SELECT name, parent_id, stripe_customer_id FROM tenants WHERE id = %s", (tenant_id,)
        ).fetchone()
    if row is None:
        raise LookupError(f"tenant {tenant_id!r} not found")
    return row[0], row[1], row[2]


def ensure_customer(conn: psycopg.Connection, client: stripe.StripeClient, tenant_id: str) -> tuple[str, bool]:
    """The tenant's Stripe customer id, created and recorded unless it has one (`conn` idle); whether it
    was created now. Raises LookupError for an unknown tenant."""
    name, parent_id, customer_id = _tenant_row(conn, tenant_id)
    if customer_id is not None:
        return customer_id, False
    params = CustomerCreateParams(name=name, metadata=_customer_metadata(tenant_id, parent_id))
    made = client.v1.customers.create(params, _idempotency(f"customer:{tenant_id}"))
    with conn.transaction():
        kept = conn.execute(
            "UPDATE tenants SET stripe_customer_id = coalesce(stripe_customer_id, %s) WHERE id = %s "
            "RETURNING stripe_customer_id",
            (made.id, tenant_id),
        ).fetchone()
    assert kept is not None
    return kept[0], kept[0] == made.id


def update_customer(conn: psycopg.Connection, client: stripe.StripeClient, tenant_id: str) -> str | None:
    """Send the tenant's name and ids to its Stripe customer (`conn` idle); the customer id, None without one."""
    name, parent_id, customer_id = _tenant_row(conn, tenant_id)
    if customer_id is None:
        return None
    params = CustomerUpdateParams(name=name, metadata=_customer_metadata(tenant_id, parent_id))
    client.v1.customers.update(customer_id, params)
    return customer_id


def sync_customers(
    conn: psycopg.Connection,
    client: stripe.StripeClient,
    progress: Callable[[str], None] = lambda _: None,
    *,
    update: bool = False,
) -> SyncReport:
    """Create a Stripe customer for every tenant without one and record its id (`conn` idle); with `update`,
    also send every existing customer the tenant's current name."""
    report = SyncReport()
    with conn.transaction():
        tenants = [r[0] for r in conn.execute("SELECT id FROM tenants ORDER BY id").fetchall()]
    for tenant_id in tenants:
        customer_id, created = ensure_customer(conn, client, tenant_id)
        if created:
            report.created.append(tenant_id)
            progress(f"tenant {tenant_id}: customer {customer_id}")
        elif update:
            update_customer(conn, client, tenant_id)
            report.updated.append(tenant_id)
            progress(f"tenant {tenant_id}: customer {customer_id} updated")
        else:
            report.kept.append(tenant_id)
    return report
