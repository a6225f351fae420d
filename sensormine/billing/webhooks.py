"""Stripe's webhooks: verified, processed once, safe in any order, each event with its effect.

`verify_event` checks the `Stripe-Signature` header (HMAC-SHA256 with the endpoint's secret, the
timestamp within `tolerance` seconds) and parses the event. `handle_event` applies it as the
metering role in one transaction with the record of its id (`stripe_webhook_events`): a second
delivery of the same event changes nothing, and an event that fails is not recorded, so Stripe's
retry applies it later. Stripe does not deliver in order: per tenant, subscription events and payment
events each keep the creation time of the newest event applied (`stripe_event_cursors`); an older
one is recorded as `stale` and changes nothing. Invoices keep the event that last wrote them.

Effects (docs/billing.md):

- `customer.subscription.created|updated`: the tenant's subscription follows (plan and interval from
  the catalogue's price ids), and its plan while the status is active or trialing; a canceled or
  expired status ends it like `customer.subscription.deleted` (back to free, a sub-tenant to its
  parent's plan).
- `customer.subscription.trial_will_end`: a notice to the tenant's administrators.
- `invoice.finalized|payment_succeeded|payment_failed`: the invoice is recorded; a failed payment
  makes the tenant past due with a grace period (`billing_grace_days` from the first failure), after
  which the free plan's limits apply (`sensormine_effective_plan`, migration 026) until an invoice is
  paid; a paid invoice ends it. Both tell the administrators.
- `payment_intent.succeeded|payment_failed`: recorded; a failed payment that no invoice covers is a
  notice.

Notices are tenant events (`tenant_events`, the API's `/api/usage/events`, beside the quota warnings),
mailed to the tenant's administrators by the notice mailer (`sensormine.metering.notices`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import stripe
from psycopg.types.json import Jsonb

from sensormine.audit import log as audit
from sensormine.billing.subscriptions import (
    IN_FORCE,
    Subscription,
    end_subscription,
    get_subscription,
    record_subscription,
)
from sensormine.clients.postgres import METERING, connect
from sensormine.metering.events import record_tenant_event
from sensormine.settings import Settings

log = logging.getLogger(__name__)

TOLERANCE_S = 300  # Stripe's default: a signature older than five minutes is refused (replays)
ENDED = ("canceled", "incomplete_expired")


class WebhooksNotConfigured(RuntimeError):
    """No webhook signing secret: nothing can be verified."""


class BadWebhook(ValueError):
    """A delivery that is not a Stripe event signed with our secret (the message says why)."""


@dataclass(frozen=True)
class WebhookResult:
    """What an event did: `outcome` is applied, stale, recorded or `ignored: <why>`."""

    event_id: str
    type: str
    tenant_id: str | None
    outcome: str
    duplicate: bool = False


@dataclass(frozen=True)
class StripeAuthor:
    """The audit log's author of what a webhook changed."""

    event_id: str

    @property
    def subject(self) -> str:
        return f"stripe:{self.event_id}"

    @property
    def role(self) -> str:
        return "system"


@dataclass(frozen=True)
class Notice:
    """What the tenant's administrators are told."""

    kind: str
    severity: str
    message: str


@dataclass
class _Event:
    conn: psycopg.Connection
    settings: Settings
    id: str
    type: str
    created: datetime
    obj: dict[str, Any]
    tenant_id: str
    notices: list[Notice] = field(default_factory=list)

    @property
    def author(self) -> StripeAuthor:
        return StripeAuthor(self.id)

    def audited(self, action: str, target_type: str, target_id: str, detail: dict[str, Any]) -> None:
        audit.record(self.conn, self.author, self.tenant_id, action, target_type, target_id,
                     {"event": self.id, "type": self.type, **detail})  # fmt: skip


def verify_event(payload: bytes, signature: str | None, secret: str | None) -> dict[str, Any]:
    """The event in a delivery whose signature is ours and recent. Raises WebhooksNotConfigured, BadWebhook."""
    if not secret:
        raise WebhooksNotConfigured(
            "Stripe webhooks are not configured: set SENSORMINE_STRIPE_WEBHOOK_SECRET to the endpoint's signing "
            "secret (whsec_...)"
        )
    if not signature:
        raise BadWebhook("no Stripe-Signature header")
    try:
        text = payload.decode()
        stripe.WebhookSignature.verify_header(text, signature, secret, TOLERANCE_S)
        event = json.loads(text)
    except stripe.SignatureVerificationError as exc:
        raise BadWebhook(f"signature refused: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadWebhook(f"not a JSON event: {exc}") from None
    if not (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(event.get("created"), int)
        and isinstance(event.get("data"), dict)
        and isinstance(event["data"].get("object"), dict)
    ):
        raise BadWebhook("not a Stripe event: id, type, created and data.object are required")
    return event


def handle_event(settings: Settings, event: dict[str, Any]) -> WebhookResult:
    """Apply a verified event once (a repeat delivery answers its first outcome, `duplicate`)."""
    event_id, kind = event["id"], event["type"]
    created = datetime.fromtimestamp(event["created"], UTC)
    obj: dict[str, Any] = event["data"]["object"]
    with connect(settings, role=METERING) as conn, conn.transaction():
        new = conn.execute(
            "INSERT INTO stripe_webhook_events (event_id, type, stripe_created, outcome, payload) "
            "VALUES (%s, %s, %s, 'received', %s) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            (event_id, kind, created, Jsonb(event)),
        ).fetchone()
        if new is None:
            row = conn.execute(
                "SELECT tenant_id, outcome FROM stripe_webhook_events WHERE event_id = %s", (event_id,)
            ).fetchone()
            assert row is not None
            return WebhookResult(event_id, kind, row[0], row[1], duplicate=True)
        tenant_id = _tenant_of(conn, obj)
        handler = HANDLERS.get(kind)
        ev: _Event | None = None
        if handler is None:
            outcome = f"ignored: {kind} is not handled"
        elif tenant_id is None:
            outcome = f"ignored: no tenant has Stripe customer {_customer_of(obj)!r}"
        else:
            ev = _Event(conn, settings, event_id, kind, created, obj, tenant_id)
            outcome = handler(ev)
            for n in ev.notices:
                data = {"severity": n.severity, "message": n.message, "stripe_event": event_id}
                record_tenant_event(conn, tenant_id, n.kind, data, _notice_key(event_id, n))
        conn.execute(
            "UPDATE stripe_webhook_events SET tenant_id = %s, outcome = %s WHERE event_id = %s",
            (tenant_id, outcome, event_id),
        )
    log.info("stripe event %s (%s) for tenant %s: %s", event_id, kind, tenant_id, outcome)
    return WebhookResult(event_id, kind, tenant_id, outcome)


def _customer_of(obj: dict[str, Any]) -> str | None:
    customer = obj.get("customer")
    if isinstance(customer, dict):  # expanded
        customer = customer.get("id")
    return customer if isinstance(customer, str) else None


def _tenant_of(conn: psycopg.Connection, obj: dict[str, Any]) -> str | None:
    customer = _customer_of(obj)
    if customer is None:
        return None
    row = conn.execute("SELECT id FROM tenants WHERE stripe_customer_id = %s", (customer,)).fetchone()
    return row[0] if row else None


def _newest(ev: _Event, stream: str) -> bool:
    """Whether `ev` is not older than the newest event applied on the tenant's `stream` (and mark it so)."""
    row = ev.conn.execute(
        "INSERT INTO stripe_event_cursors (tenant_id, stream, last_created, last_event_id) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (tenant_id, stream) DO UPDATE SET last_created = excluded.last_created, "
        "last_event_id = excluded.last_event_id WHERE stripe_event_cursors.last_created <= excluded.last_created "
        "RETURNING 1",
        (ev.tenant_id, stream, ev.created, ev.id),
    ).fetchone()
    return row is not None


STALE = "stale: a newer event was applied"


# -- subscriptions ---------------------------------------------------------------------------------


def _plan_of_price(conn: psycopg.Connection, price_id: str) -> tuple[str, str] | None:
    row = conn.execute("SELECT key FROM stripe_catalog WHERE stripe_id = %s", (price_id,)).fetchone()
    if row is None or not row[0].startswith("price:"):
        return None
    _, plan, interval = row[0].split(":")
    return plan, interval


def _subscription_changed(ev: _Event) -> str:
    sub = ev.obj
    if not _newest(ev, "subscription"):
        return STALE
    if sub.get("status") in ENDED:
        return _subscription_ended(ev, newest_checked=True)
    items = (sub.get("items") or {}).get("data") or []
    if not items:
        return "ignored: the subscription has no items"
    price = items[0].get("price") or {}
    found = _plan_of_price(ev.conn, str(price.get("id")))
    if found is None:
        return f"ignored: price {price.get('id')!r} is not in the catalogue (`sensormine billing sync-catalog`)"
    plan, interval = found
    current = get_subscription(ev.conn, ev.tenant_id)
    tenant_plan = ev.conn.execute("SELECT plan FROM tenants WHERE id = %s", (ev.tenant_id,)).fetchone()
    assert tenant_plan is not None
    status = str(sub["status"])
    record_subscription(ev.conn, Subscription(ev.tenant_id, sub["id"], items[0]["id"], plan, interval, status))
    detail: dict[str, Any] = {"plan": plan, "interval": interval, "status": status}
    if current is not None:
        detail["from"] = {"plan": current.plan, "interval": current.interval, "status": current.status}
    if status in IN_FORCE and tenant_plan[0] != plan:
        ev.conn.execute("UPDATE tenants SET plan = %s, updated_at = now() WHERE id = %s", (plan, ev.tenant_id))
        detail["tenant_plan"] = {"from": tenant_plan[0], "to": plan}
    ev.audited("billing.subscription.sync", "subscription", sub["id"], detail)
    return "applied"


def _subscription_ended(ev: _Event, newest_checked: bool = False) -> str:
    sub = ev.obj
    if not newest_checked and not _newest(ev, "subscription"):
        return STALE
    current = get_subscription(ev.conn, ev.tenant_id)
    if current is None or current.stripe_subscription_id != sub.get("id"):
        return "ignored: not the tenant's current subscription"
    end_subscription(ev.conn, ev.tenant_id)
    row = ev.conn.execute("SELECT sensormine_effective_plan(%s)", (ev.tenant_id,)).fetchone()
    plan = row[0] if row else "free"
    ev.audited("billing.subscription.end", "subscription", sub["id"], {"status": sub.get("status"), "plan": plan})
    ev.notices.append(
        Notice("billing.subscription_ended", "warning", f"The subscription has ended: the {plan} plan applies now.")
    )
    return "applied"


def _trial_will_end(ev: _Event) -> str:
    end = ev.obj.get("trial_end")
    when = f"on {datetime.fromtimestamp(end, UTC):%Y-%m-%d %H:%M} UTC" if isinstance(end, int) else "soon"
    ev.notices.append(
        Notice(
            "billing.trial_will_end",
            "warning",
            f"The trial ends {when}: add a payment method to keep the plan; without one the subscription ends "
            "and the free plan's limits apply.",
        )
    )
    return "applied"


# -- invoices and payments -------------------------------------------------------------------------


def _ts(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


def _money(cents: Any, currency: Any) -> str:
    return f"{(cents or 0) / 100:.2f} {str(currency or '').upper()}".strip()


def _record_invoice(ev: _Event) -> None:
    inv = ev.obj
    ev.conn.execute(
        "INSERT INTO tenant_invoices (stripe_invoice_id, tenant_id, number, status, currency, amount_due, amount_paid, "
        "period_start, period_end, hosted_invoice_url, stripe_created, event_created) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (stripe_invoice_id) DO UPDATE SET "
        "number = excluded.number, status = excluded.status, amount_due = excluded.amount_due, "
        "amount_paid = excluded.amount_paid, hosted_invoice_url = excluded.hosted_invoice_url, "
        "event_created = excluded.event_created, updated_at = now() "
        "WHERE tenant_invoices.event_created <= excluded.event_created",
        (
            inv["id"], ev.tenant_id, inv.get("number"), inv.get("status") or "open", inv.get("currency") or "usd",
            inv.get("amount_due") or 0, inv.get("amount_paid") or 0, _ts(inv.get("period_start")),
            _ts(inv.get("period_end")), inv.get("hosted_invoice_url"), _ts(inv.get("created")) or ev.created,
            ev.created,
        ),
    )  # fmt: skip


def _invoice_finalized(ev: _Event) -> str:
    _record_invoice(ev)
    return "applied"


def _invoice_paid(ev: _Event) -> str:
    _record_invoice(ev)
    if not _newest(ev, "payment"):
        return STALE
    row = ev.conn.execute(
        "SELECT status FROM tenant_payment_status WHERE tenant_id = %s FOR UPDATE", (ev.tenant_id,)
    ).fetchone()
    ev.conn.execute(
        "INSERT INTO tenant_payment_status (tenant_id, status, invoice_id) VALUES (%s, 'paid', %s) "
        "ON CONFLICT (tenant_id) DO UPDATE SET status = 'paid', past_due_since = NULL, grace_until = NULL, "
        "invoice_id = excluded.invoice_id, updated_at = now()",
        (ev.tenant_id, ev.obj["id"]),
    )
    if row is not None and row[0] == "past_due":
        ev.audited("billing.payment.recovered", "invoice", ev.obj["id"], {})
        ev.notices.append(
            Notice(
                "billing.payment_recovered", "info", f"Invoice {_invoice_name(ev.obj)} is paid: the plan applies again."
            )
        )
    return "applied"


def _invoice_name(inv: dict[str, Any]) -> str:
    return f"{inv.get('number') or inv['id']} ({_money(inv.get('amount_due'), inv.get('currency'))})"


def _invoice_payment_failed(ev: _Event) -> str:
    _record_invoice(ev)
    if not _newest(ev, "payment"):
        return STALE
    grace_until = ev.created + timedelta(days=ev.settings.billing_grace_days)
    row = ev.conn.execute(
        "INSERT INTO tenant_payment_status (tenant_id, status, past_due_since, grace_until, invoice_id) "
        "VALUES (%s, 'past_due', %s, %s, %s) ON CONFLICT (tenant_id) DO UPDATE SET status = 'past_due', "
        "past_due_since = coalesce(tenant_payment_status.past_due_since, excluded.past_due_since), "
        "grace_until = coalesce(tenant_payment_status.grace_until, excluded.grace_until), "
        "invoice_id = excluded.invoice_id, updated_at = now() RETURNING grace_until",
        (ev.tenant_id, ev.created, grace_until, ev.obj["id"]),
    ).fetchone()
    assert row is not None
    until: datetime = row[0]
    ev.audited("billing.payment.failed", "invoice", ev.obj["id"], {"grace_until": until.isoformat()})
    ev.notices.append(
        Notice(
            "billing.payment_failed",
            "critical",
            f"Payment of invoice {_invoice_name(ev.obj)} failed. Pay it by {until.astimezone(UTC):%Y-%m-%d %H:%M} "
            "UTC; after that the free plan's limits apply until an invoice is paid.",
        )
    )
    return "applied"


def _payment_intent_succeeded(ev: _Event) -> str:
    return "recorded"


def _payment_intent_failed(ev: _Event) -> str:
    pi = ev.obj
    if pi.get("invoice"):
        return "recorded: its invoice's events tell the tenant"
    error = (pi.get("last_payment_error") or {}).get("message") or "no reason given"
    ev.notices.append(
        Notice(
            "billing.payment_intent_failed",
            "warning",
            f"A payment of {_money(pi.get('amount'), pi.get('currency'))} failed: {error}",
        )
    )
    return "applied"


HANDLERS: dict[str, Callable[[_Event], str]] = {
    "customer.subscription.created": _subscription_changed,
    "customer.subscription.updated": _subscription_changed,
    "customer.subscription.deleted": _subscription_ended,
    "customer.subscription.trial_will_end": _trial_will_end,
    "invoice.finalized": _invoice_finalized,
    "invoice.payment_succeeded": _invoice_paid,
    "invoice.paid": _invoice_paid,
    "invoice.payment_failed": _invoice_payment_failed,
    "payment_intent.succeeded": _payment_intent_succeeded,
    "payment_intent.payment_failed": _payment_intent_failed,
}


def _notice_key(event_id: str, n: Notice) -> str:
    return f"stripe:{event_id}:{n.kind}"
