"""A tenant's payment methods: a SetupIntent for Stripe Elements to collect a card, then the resulting
payment method attached to the tenant's customer (and made the invoices' default), listed, detached.
Card numbers never reach Sensormine: it keeps what Stripe answers (brand, last four, expiry)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from stripe.params import SetupIntentCreateParams

from sensormine.audit import log as audit
from sensormine.billing.stripe_sync import ensure_customer
from sensormine.clients.postgres import METERING, connect
from sensormine.clients.stripe_api import make_stripe_client
from sensormine.settings import Settings


class UnknownPaymentMethod(LookupError):
    """The tenant has no such payment method."""


@dataclass(frozen=True)
class PaymentMethod:
    """A payment method as Stripe described it (no card number ever reaches Sensormine)."""

    stripe_payment_method_id: str
    type: str
    brand: str | None
    last4: str | None
    exp_month: int | None
    exp_year: int | None
    is_default: bool
    created_at: datetime | None = None


COLUMNS = "stripe_payment_method_id, type, brand, last4, exp_month, exp_year, is_default, created_at"


def _customer(settings: Settings, tenant_id: str) -> str:
    with connect(settings, role=METERING) as billing:
        customer_id, _ = ensure_customer(billing, make_stripe_client(settings), tenant_id)
    return customer_id


def start_setup(settings: Settings, tenant_id: str) -> tuple[str, str]:
    """(SetupIntent id, client secret) for Stripe Elements to collect a card for the tenant's customer."""
    customer = _customer(settings, tenant_id)
    params = SetupIntentCreateParams(customer=customer, usage="off_session")
    intent = make_stripe_client(settings).v1.setup_intents.create(params)
    return intent.id, str(intent.client_secret)


def list_payment_methods(conn: psycopg.Connection, tenant_id: str) -> list[PaymentMethod]:
    """The tenant's payment methods, the default first (caller's scope)."""
    rows = conn.execute(
        f"SELECT {COLUMNS} FROM tenant_payment_methods WHERE tenant_id = %s ORDER BY is_default DESC, created_at",
        (tenant_id,),
    ).fetchall()
    return [PaymentMethod(*r) for r in rows]


def add_payment_method(
    conn: psycopg.Connection, actor: audit.Actor, settings: Settings, tenant_id: str, payment_method_id: str,
    make_default: bool = True,
) -> PaymentMethod:  # fmt: skip
    """Attach a payment method (from a confirmed SetupIntent) to the tenant's customer; with `make_default`,
    invoices charge it. Raises BillingNotConfigured, stripe.StripeError."""
    customer = _customer(settings, tenant_id)
    client = make_stripe_client(settings)
    pm = client.v1.payment_methods.attach(payment_method_id, {"customer": customer})
    if make_default:
        client.v1.customers.update(customer, {"invoice_settings": {"default_payment_method": pm.id}})
    card = pm.card
    with actor.scope(conn, write=True):
        if make_default:
            conn.execute("UPDATE tenant_payment_methods SET is_default = false WHERE tenant_id = %s", (tenant_id,))
        row = conn.execute(
            "INSERT INTO tenant_payment_methods (stripe_payment_method_id, tenant_id, type, brand, last4, exp_month, "
            "exp_year, is_default) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (stripe_payment_method_id) "
            f"DO UPDATE SET is_default = excluded.is_default OR tenant_payment_methods.is_default RETURNING {COLUMNS}",
            (pm.id, tenant_id, pm.type, card.brand if card else None, card.last4 if card else None,
             card.exp_month if card else None, card.exp_year if card else None, make_default),
        ).fetchone()  # fmt: skip
        assert row is not None
        added = PaymentMethod(*row)
        audit.record(conn, actor, tenant_id, "billing.payment_method.add", "payment_method", pm.id,
                     {"brand": added.brand, "last4": added.last4, "default": added.is_default})  # fmt: skip
    return added


def remove_payment_method(
    conn: psycopg.Connection, actor: audit.Actor, settings: Settings, tenant_id: str, payment_method_id: str
) -> None:
    """Detach one of the tenant's payment methods at Stripe and forget it. Raises UnknownPaymentMethod,
    BillingNotConfigured, stripe.StripeError."""
    with actor.scope(conn):
        known = conn.execute(
            "SELECT 1 FROM tenant_payment_methods WHERE tenant_id = %s AND stripe_payment_method_id = %s",
            (tenant_id, payment_method_id),
        ).fetchone()
    if known is None:
        raise UnknownPaymentMethod(f"tenant {tenant_id!r} has no payment method {payment_method_id!r}")
    make_stripe_client(settings).v1.payment_methods.detach(payment_method_id)
    with actor.scope(conn, write=True):
        conn.execute(
            "DELETE FROM tenant_payment_methods WHERE tenant_id = %s AND stripe_payment_method_id = %s",
            (tenant_id, payment_method_id),
        )
        audit.record(conn, actor, tenant_id, "billing.payment_method.remove", "payment_method", payment_method_id)
