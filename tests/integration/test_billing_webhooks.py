"""Stripe's webhooks through the API (`POST /api/billing/webhooks/stripe`) on PostgreSQL, with events
built from stripe-mock's own objects (the launcher's official API mock; it sends no webhooks, so the
test signs each delivery with the endpoint's secret as Stripe does): signatures, once-only
processing, out-of-order delivery, and each event's effect on the tenant's plan, payment state,
invoices, notices (tenant events) and e-mail."""

from __future__ import annotations

import json
import mailbox
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import stripe
from fastapi.testclient import TestClient

from sensormine.billing.stripe_sync import sync_catalog
from sensormine.clients.postgres import METERING, connect
from sensormine.clients.stripe_api import make_stripe_client
from sensormine.identity.users import create_user
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant, wait_for

pytestmark = pytest.mark.integration
URL = "/api/billing/webhooks/stripe"


def _body(event: dict[str, Any]) -> str:
    return json.dumps(event, default=str)  # the SDK's objects hold Decimal amounts; Stripe sends them as strings


@dataclass
class Stripe:
    """Sends events to the app as Stripe would, their objects fetched from stripe-mock."""

    http: TestClient
    client: stripe.StripeClient
    secret: str

    def obj(self, kind: str, **fields: Any) -> dict[str, Any]:
        """stripe-mock's canned object of `kind` with `fields` replaced."""
        found = {
            "subscription": self.client.v1.subscriptions.retrieve,
            "invoice": self.client.v1.invoices.retrieve,
            "payment_intent": self.client.v1.payment_intents.retrieve,
        }[kind]("x_1")
        return {**found.to_dict(), **fields}

    def event(self, type_: str, obj: dict[str, Any], created: datetime) -> dict[str, Any]:
        envelope = self.client.v1.events.retrieve("evt_1").to_dict()
        return {
            **envelope,
            "id": f"evt_{uuid.uuid4().hex}",
            "type": type_,
            "created": int(created.timestamp()),
            "data": {"object": obj},
        }

    def send(self, event: dict[str, Any], secret: str | None = None, signed_at: int | None = None) -> httpx.Response:
        body = _body(event)
        header = stripe.WebhookSignature.generate_signature_header(body, secret or self.secret, signed_at)
        return self.http.post(
            URL, content=body, headers={"Stripe-Signature": header, "Content-Type": "application/json"}
        )

    def deliver(self, event: dict[str, Any]) -> dict[str, Any]:
        response = self.send(event)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def world(settings: Settings, conn: psycopg.Connection) -> Iterator[tuple[Stripe, dict[str, str], dict[str, str]]]:
    """acme (pro, with a Stripe customer and a tenant admin) and globex; the catalogue at stripe-mock."""
    if not settings.stripe_api_base:
        pytest.skip("needs stripe-mock (sensormine services up)")
    admin = make_tenant(conn, "acme", [f"d{i}" for i in range(10)], role="tenant_admin")
    make_tenant(conn, "globex", [], role="tenant_admin")
    create_user(conn, "acme", "boss@acme.example", "a-long-password", "tenant_admin")
    conn.execute("UPDATE tenants SET stripe_customer_id = 'cus_' || id")
    conn.commit()
    client = make_stripe_client(settings)
    with connect(settings, role=METERING) as billing:
        sync_catalog(billing, client)
        prices = dict(billing.execute("SELECT key, stripe_id FROM stripe_catalog").fetchall())
    assert settings.stripe_webhook_secret
    with TestClient(create_app(settings)) as http:
        yield Stripe(http, client, settings.stripe_webhook_secret), {"X-API-Key": admin}, prices


def _billing(s: Stripe, headers: dict[str, str]) -> dict[str, Any]:
    response = s.http.get("/api/billing/subscription", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _sub(s: Stripe, prices: dict[str, str], key: str, status: str = "active", **fields: Any) -> dict[str, Any]:
    """stripe-mock's subscription as acme's, on the catalogue's price `key`."""
    canned = s.obj("subscription", id="sub_acme", customer="cus_acme", status=status, **fields)
    item = canned["items"]["data"][0]
    item = {**item, "id": "si_acme", "price": {**item["price"], "id": prices[key]}}
    return {**canned, "items": {**canned["items"], "data": [item]}}


def _notices(s: Stripe, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The billing notices among the tenant's events, newest first."""
    response = s.http.get("/api/usage/events", headers=headers)
    assert response.status_code == 200, response.text
    return [e for e in response.json()["items"] if e["type"].startswith("billing.")]


def _events(conn: psycopg.Connection) -> list[tuple[str, str | None, str]]:
    rows = conn.execute("SELECT type, tenant_id, outcome FROM stripe_webhook_events ORDER BY received_at").fetchall()
    conn.commit()
    return rows


def test_deliveries_not_signed_with_the_endpoints_secret_are_refused_and_leave_no_trace(
    world: tuple[Stripe, dict[str, str], dict[str, str]], conn: psycopg.Connection
) -> None:
    s, _, prices = world
    event = s.event("customer.subscription.created", _sub(s, prices, "price:pro:month"),
                    datetime.now(UTC))  # fmt: skip
    signed = stripe.WebhookSignature.generate_signature_header(_body(event), s.secret)
    cases = {
        "no header": s.http.post(URL, content=_body(event)),
        "another secret": s.send(event, secret="whsec_someone_else"),
        "stale signature": s.send(event, signed_at=int(time.time()) - 301),
        "tampered body": s.http.post(
            URL,
            content=_body({**event, "type": "invoice.paid"}),
            headers={"Stripe-Signature": signed},
        ),
    }
    for why, response in cases.items():
        assert response.status_code == 400, (why, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), why
    assert "no Stripe-Signature header" in cases["no header"].json()["detail"]
    assert "tolerance" in cases["stale signature"].json()["detail"]
    assert _events(conn) == []
    assert _billing(s, world[1])["plan"] == "pro" and _billing(s, world[1])["subscription"] is None


def test_without_a_webhook_secret_the_route_says_what_to_set(settings: Settings, conn: psycopg.Connection) -> None:
    unset = settings.model_copy(update={"stripe_webhook_secret": None})
    with TestClient(create_app(unset)) as http:
        response = http.post(URL, content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
    assert response.status_code == 503
    assert "SENSORMINE_STRIPE_WEBHOOK_SECRET" in response.json()["detail"]


def test_subscription_events_apply_once_and_an_older_event_arriving_late_changes_nothing(
    world: tuple[Stripe, dict[str, str], dict[str, str]], conn: psycopg.Connection
) -> None:
    s, admin, prices = world
    t0 = datetime.now(UTC) - timedelta(hours=1)
    conn.execute("UPDATE tenants SET plan = 'free' WHERE id = 'acme'")
    conn.commit()
    created = s.event("customer.subscription.created",
                      _sub(s, prices, "price:pro:month"), t0)  # fmt: skip
    assert s.deliver(created) == {"event_id": created["id"], "type": created["type"], "outcome": "applied",
                                  "duplicate": False}  # fmt: skip
    got = _billing(s, admin)
    assert got["plan"] == "pro"
    assert {k: got["subscription"][k] for k in ("stripe_subscription_id", "plan", "interval", "status")} == {
        "stripe_subscription_id": "sub_acme", "plan": "pro", "interval": "month", "status": "active"
    }  # fmt: skip

    again = s.deliver(created)  # Stripe retries when it missed our answer
    assert again["duplicate"] is True and again["outcome"] == "applied"

    yearly = s.event("customer.subscription.updated",
                     _sub(s, prices, "price:pro:year"), t0 + timedelta(minutes=10))  # fmt: skip
    late = s.event("customer.subscription.updated",
                   _sub(s, prices, "price:pro:month", "past_due"),
                   t0 + timedelta(minutes=5))  # fmt: skip
    assert s.deliver(yearly)["outcome"] == "applied"
    assert s.deliver(late)["outcome"].startswith("stale")
    sub = _billing(s, admin)["subscription"]
    assert (sub["interval"], sub["status"]) == ("year", "active")

    ended = s.event("customer.subscription.deleted",
                    _sub(s, prices, "price:pro:year", "canceled"),
                    t0 + timedelta(minutes=20))  # fmt: skip
    resurrect = s.event("customer.subscription.updated",
                        _sub(s, prices, "price:pro:year"), t0 + timedelta(minutes=15))  # fmt: skip
    assert s.deliver(ended)["outcome"] == "applied"
    assert s.deliver(resurrect)["outcome"].startswith("stale")
    after = _billing(s, admin)
    assert after["plan"] == "free" and after["subscription"] is None

    actions = conn.execute(
        "SELECT actor, actor_role, action, detail->>'plan' FROM audit_log WHERE tenant_id = 'acme' ORDER BY id"
    ).fetchall()
    conn.commit()
    assert actions == [
        (f"stripe:{created['id']}", "system", "billing.subscription.sync", "pro"),
        (f"stripe:{yearly['id']}", "system", "billing.subscription.sync", "pro"),
        (f"stripe:{ended['id']}", "system", "billing.subscription.end", "free"),
    ]
    notices = _notices(s, admin)
    assert [n["type"] for n in notices] == ["billing.subscription_ended"]
    assert [o for _, _, o in _events(conn)] == ["applied", "applied", "stale: a newer event was applied", "applied",
                                               "stale: a newer event was applied"]  # fmt: skip


def test_a_failed_payment_opens_a_grace_period_then_the_free_plans_limits_apply_until_an_invoice_is_paid(
    world: tuple[Stripe, dict[str, str], dict[str, str]], conn: psycopg.Connection, services: dict[str, str]
) -> None:
    s, admin, _ = world
    now = datetime.now(UTC)
    number = f"ACME-{uuid.uuid4().hex[:8]}"  # the launcher's mailbox is shared by every test
    invoice = s.obj("invoice", id="in_acme_1", customer="cus_acme", number=number, status="open",
                    amount_due=9900, amount_paid=0)  # fmt: skip
    assert s.deliver(s.event("invoice.finalized", invoice, now - timedelta(days=9)))["outcome"] == "applied"
    # Failed nine days ago: the seven days of grace are over, so the free plan's limits apply now.
    failed = s.event("invoice.payment_failed", invoice, now - timedelta(days=9) + timedelta(minutes=1))
    assert s.deliver(failed)["outcome"] == "applied"
    got = _billing(s, admin)
    assert got["plan"] == "free" and got["payment"]["status"] == "past_due"
    assert datetime.fromisoformat(got["payment"]["grace_until"]) == datetime.fromtimestamp(
        failed["created"], UTC
    ) + timedelta(days=7)
    # acme has 10 devices: the pro plan allows 100, the free plan 10.
    refused = s.http.post("/api/devices", json={"id": "d10", "device_type": "press"}, headers=admin)
    assert refused.status_code == 429 and "plan free allows 10 devices" in refused.json()["detail"], refused.text
    assert s.http.get("/api/auth/me", headers=admin).json()["plan"] == "free"

    # A second failure (a retry) does not move the grace period.
    retry = s.event("invoice.payment_failed", invoice, now - timedelta(days=2))
    assert s.deliver(retry)["outcome"] == "applied"
    assert _billing(s, admin)["payment"]["grace_until"] == got["payment"]["grace_until"]

    paid = s.obj("invoice", **{**invoice, "status": "paid", "amount_paid": 9900})
    assert s.deliver(s.event("invoice.payment_succeeded", paid, now - timedelta(minutes=5)))["outcome"] == "applied"
    back = _billing(s, admin)
    assert back["plan"] == "pro" and back["payment"] == {"status": "paid", "past_due_since": None,
                                                          "grace_until": None, "invoice_id": "in_acme_1"}  # fmt: skip
    assert s.http.post("/api/devices", json={"id": "d10", "device_type": "press"}, headers=admin).status_code == 201
    # The first failure's retry delivered once more, after the payment: stale, still paid.
    late = s.event("invoice.payment_failed", invoice, now - timedelta(days=1))
    assert s.deliver(late)["outcome"].startswith("stale")
    assert _billing(s, admin)["payment"]["status"] == "paid"

    (inv,) = s.http.get("/api/billing/invoices", headers=admin).json()
    assert {k: inv[k] for k in ("stripe_invoice_id", "number", "status", "amount_due", "amount_paid", "currency")} == {
        "stripe_invoice_id": "in_acme_1", "number": number, "status": "paid", "amount_due": 9900,
        "amount_paid": 9900, "currency": "usd",
    }  # fmt: skip
    notices = _notices(s, admin)
    assert [n["type"] for n in notices] == ["billing.payment_recovered", "billing.payment_failed",
                                            "billing.payment_failed"]  # fmt: skip
    assert f"{number} (99.00 USD)" in notices[-1]["data"]["message"]
    # The notice mailer (a thread of the API) mails each notice to the tenant's administrators once.
    maildir = mailbox.Maildir(services["SENSORMINE_SMTP_MAILDIR"], create=False)

    def both_mails() -> list[mailbox.MaildirMessage] | None:
        found = [m for m in maildir if m["X-Sensormine-Notice"] == "billing.payment_failed"
                 and number in m.get_payload() and "boss@acme.example" in (m["X-RcptTo"] or "")]  # fmt: skip
        return found if len(found) == 2 else None

    mails = wait_for(both_mails, "the two payment-failed e-mails")
    mailed = wait_for(lambda: (n := _notices(s, admin)[-1])["data"].get("emailed_to") and n, "the mail recorded")
    assert mailed["data"]["emailed_to"] == ["boss@acme.example"]
    assert "acme" in mails[0]["Subject"]
    # globex was never touched.
    assert conn.execute("SELECT count(*) FROM tenant_payment_status WHERE tenant_id = 'globex'").fetchone()[0] == 0


def test_a_recent_failure_keeps_the_plan_during_the_grace_period(
    world: tuple[Stripe, dict[str, str], dict[str, str]],
) -> None:
    s, admin, _ = world
    invoice = s.obj("invoice", id="in_acme_2", customer="cus_acme", status="open", amount_due=9900)
    assert s.deliver(s.event("invoice.payment_failed", invoice, datetime.now(UTC)))["outcome"] == "applied"
    got = _billing(s, admin)
    assert got["plan"] == "pro" and got["payment"]["status"] == "past_due"
    assert s.http.post("/api/devices", json={"id": "d10", "device_type": "press"}, headers=admin).status_code == 201


def test_trial_ending_tells_the_admins_and_unknown_events_are_recorded_and_ignored(
    world: tuple[Stripe, dict[str, str], dict[str, str]], conn: psycopg.Connection
) -> None:
    s, admin, prices = world
    now = datetime.now(UTC)
    trial_end = int((now + timedelta(days=3)).timestamp())
    trial = s.event("customer.subscription.trial_will_end",
                    _sub(s, prices, "price:pro:month", "trialing", trial_end=trial_end),
                    now)  # fmt: skip
    assert s.deliver(trial)["outcome"] == "applied"
    (notice,) = _notices(s, admin)
    assert notice["type"] == "billing.trial_will_end" and notice["data"]["severity"] == "warning"
    assert f"{datetime.fromtimestamp(trial_end, UTC):%Y-%m-%d}" in notice["data"]["message"]

    stranger = s.event("invoice.payment_failed", s.obj("invoice", id="in_x", customer="cus_nobody"), now)
    assert s.deliver(stranger)["outcome"] == "ignored: no tenant has Stripe customer 'cus_nobody'"
    other = s.event("charge.refunded", s.obj("payment_intent", customer="cus_acme"), now)
    assert s.deliver(other)["outcome"] == "ignored: charge.refunded is not handled"
    own = s.event("payment_intent.payment_failed",
                  s.obj("payment_intent", customer="cus_acme", invoice=None,
                        last_payment_error={"message": "Your card was declined."}), now)  # fmt: skip
    assert s.deliver(own)["outcome"] == "applied"
    assert "Your card was declined." in _notices(s, admin)[0]["data"]["message"]
    assert [(t, tenant) for t, tenant, _ in _events(conn)] == [
        ("customer.subscription.trial_will_end", "acme"),
        ("invoice.payment_failed", None),
        ("charge.refunded", "acme"),
        ("payment_intent.payment_failed", "acme"),
    ]
