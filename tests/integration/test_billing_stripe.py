"""`sensormine billing sync-catalog|sync-customers` through the CLI, and sign-up through the API, against
stripe-mock (the official Stripe API mock the launcher starts) and PostgreSQL: created once, recorded,
never twice; a Stripe outage never stops a sign-up."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import psycopg
import pytest
from click.testing import Result
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cli.main import app
from sensormine.billing.stripe_sync import METERS, PRICES, PRODUCTS
from sensormine.billing.usecases import provision_customer
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.users import create_user
from sensormine.settings import Settings, reset_settings
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app
from tests.factories import make_tenant
from tests.integration.test_tenants_api import PASSWORD, Api

pytestmark = pytest.mark.integration


@pytest.fixture
def billing(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Result]]:
    if not settings.stripe_api_base:
        pytest.skip("needs stripe-mock (sensormine services up)")
    for name, value in {
        "SENSORMINE_DATABASE_URL": settings.database_url,
        "SENSORMINE_DATABASE_MIGRATE_URL": settings.database_migrate_url,
        "SENSORMINE_STRIPE_API_BASE": settings.stripe_api_base,
        "SENSORMINE_STRIPE_API_KEY": settings.stripe_api_key,
        "SENSORMINE_ENV": settings.env,
    }.items():
        monkeypatch.setenv(name, value or "")
    reset_settings()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, ["billing", *args])
    reset_settings()


def test_the_catalogue_is_created_once(billing: Callable[..., Result], conn: psycopg.Connection) -> None:
    first = billing("sync-catalog")
    assert first.exit_code == 0, first.output
    entries = len(PRODUCTS) + len(PRICES) + len(METERS)
    assert f"catalogue: {entries} created, 0 already at Stripe" in first.output
    rows = dict(conn.execute("SELECT key, stripe_id FROM stripe_catalog").fetchall())
    conn.commit()
    assert sorted(rows) == sorted(
        [f"product:{p}" for p in PRODUCTS]
        + ["price:free:month", "price:pro:month", "price:pro:year"]
        + [f"meter:{m}" for m in METERS]
    )
    assert all(v.startswith("prod_") for k, v in rows.items() if k.startswith("product:"))
    assert all(v.startswith("price_") for k, v in rows.items() if k.startswith("price:"))
    assert all(v.startswith("meter_") for k, v in rows.items() if k.startswith("meter:"))
    detail = conn.execute("SELECT detail FROM stripe_catalog WHERE key = 'price:pro:year'").fetchone()[0]
    assert detail == {"amount": "990", "currency": "usd", "interval": "year"}

    again = billing("sync-catalog")  # the mock would happily make new ones: the recorded ids prevent it
    assert again.exit_code == 0 and f"catalogue: 0 created, {entries} already at Stripe" in again.output
    assert dict(conn.execute("SELECT key, stripe_id FROM stripe_catalog").fetchall()) == rows


def test_every_tenant_gets_one_customer_and_a_new_tenant_its_own_later(
    billing: Callable[..., Result], conn: psycopg.Connection
) -> None:
    make_tenant(conn, "acme", [])
    make_tenant(conn, "acme-east", [], parent_id="acme")
    conn.commit()
    first = billing("sync-customers")
    assert first.exit_code == 0 and "customers: 2 created, 0 already at Stripe" in first.output, first.output
    ids = dict(conn.execute("SELECT id, stripe_customer_id FROM tenants").fetchall())
    conn.commit()
    assert set(ids) == {"acme", "acme-east"} and all(v.startswith("cus_") for v in ids.values())
    assert len(set(ids.values())) == 2

    make_tenant(conn, "globex", [])
    conn.commit()
    second = billing("sync-customers")
    assert second.exit_code == 0 and "customers: 1 created, 2 already at Stripe" in second.output
    after = dict(conn.execute("SELECT id, stripe_customer_id FROM tenants").fetchall())
    assert {k: v for k, v in after.items() if k != "globex"} == ids and after["globex"].startswith("cus_")


def test_without_a_stripe_key_the_command_says_what_to_set(
    billing: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENSORMINE_STRIPE_API_KEY", "")
    reset_settings()
    out = billing("sync-catalog")
    assert out.exit_code == 1 and "SENSORMINE_STRIPE_API_KEY" in out.output and "services up" in out.output


def test_stripe_refusing_a_request_is_reported_with_what_to_do(
    billing: Callable[..., Result], monkeypatch: pytest.MonkeyPatch, conn: psycopg.Connection
) -> None:
    make_tenant(conn, "acme", [])
    conn.commit()
    monkeypatch.setenv("SENSORMINE_STRIPE_API_KEY", "not-a-key")  # stripe-mock answers 401 to a malformed key
    reset_settings()
    out = billing("sync-customers")
    assert out.exit_code == 1 and "Stripe refused" in out.output and "run the command again" in out.output
    assert conn.execute("SELECT stripe_customer_id FROM tenants").fetchall() == [(None,)]


def test_signing_up_through_the_api_makes_the_tenants_customer(settings: Settings, conn: psycopg.Connection) -> None:
    if not settings.stripe_api_base:
        pytest.skip("needs stripe-mock (sensormine services up)")
    create_user(conn, None, "root@platform.test", PASSWORD, "platform_admin")
    conn.commit()
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as client:
        api = Api(client)
        root = api.login("root@platform.test")
        assert client.post("/api/tenants", json={"id": "acme", "plan": "pro"}, headers=root).status_code == 201
        admin = api.user(root, "admin@acme.test", "tenant_admin", "acme")
        assert client.post("/api/tenants", json={"id": "acme-plant1"}, headers=admin).status_code == 201
    ids = dict(conn.execute("SELECT id, stripe_customer_id FROM tenants").fetchall())
    assert set(ids) == {"acme", "acme-plant1"} and all(v and v.startswith("cus_") for v in ids.values())
    assert len(set(ids.values())) == 2


def test_a_stripe_outage_does_not_stop_a_sign_up_and_the_sync_makes_the_customer_later(
    settings: Settings, conn: psycopg.Connection, billing: Callable[..., Result], caplog: pytest.LogCaptureFixture
) -> None:
    create_user(conn, None, "root@platform.test", PASSWORD, "platform_admin")
    conn.commit()
    closed = settings.model_copy(update={"kafka_bootstrap": None, "stripe_api_base": "http://127.0.0.1:9"})
    with TestClient(create_app(closed)) as client:
        root = Api(client).login("root@platform.test")
        assert client.post("/api/tenants", json={"id": "acme", "plan": "pro"}, headers=root).status_code == 201
    assert conn.execute("SELECT stripe_customer_id FROM tenants WHERE id = 'acme'").fetchone() == (None,)
    conn.commit()
    assert "created without its Stripe customer" in caplog.text and "sync-customers" in caplog.text
    done = billing("sync-customers")  # Stripe (the mock) answers again
    assert done.exit_code == 0 and "customers: 1 created" in done.output, done.output
    (customer,) = conn.execute("SELECT stripe_customer_id FROM tenants WHERE id = 'acme'").fetchone()
    assert customer.startswith("cus_")


def test_a_tenant_admin_subscribes_changes_and_cancels_and_the_plan_follows(
    settings: Settings, conn: psycopg.Connection, billing: Callable[..., Result]
) -> None:
    create_tenant(conn, "acme", plan="free")
    keys = {r: create_api_key(conn, "acme", r, role=r) for r in ("tenant_admin", "viewer")}
    conn.commit()
    admin, viewer = {"X-API-Key": keys["tenant_admin"]}, {"X-API-Key": keys["viewer"]}
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as client:
        url = "/api/billing/subscription"
        early = client.put(url, json={"plan": "pro"}, headers=admin)
        assert early.status_code == 409 and "sync-catalog" in early.json()["detail"]  # nothing sold yet
        assert billing("sync-catalog").exit_code == 0

        assert client.get(url, headers=admin).json() == {
            "tenant_id": "acme",
            "plan": "free",
            "subscription": None,
            "payment": None,
        }
        assert client.put(url, json={"plan": "pro"}, headers=viewer).status_code == 403
        for bad in ({"plan": "free"}, {"plan": "enterprise"}, {"plan": "pro", "interval": "week"}):
            resp = client.put(url, json=bad, headers=admin)
            assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json", bad

        made = client.put(url, json={"plan": "pro", "interval": "month"}, headers=admin)
        assert made.status_code == 200, made.text
        sub = made.json()
        assert (sub["plan"], sub["interval"], sub["status"]) == ("pro", "month", "active")
        assert sub["stripe_subscription_id"].startswith("sub_")
        shown = client.get(url, headers=admin).json()
        assert shown["plan"] == "pro" and shown["subscription"]["interval"] == "month"
        assert client.get(url, headers=viewer).status_code == 403  # billing is the tenant admins' business
        usage = client.get("/api/usage", headers=admin).json()
        assert usage["plan"] == "pro" and usage["api_calls"]["limit"] == 1_000_000  # the plan's limits apply

        changed = client.put(url, json={"plan": "pro", "interval": "year"}, headers=admin)
        assert changed.status_code == 200 and changed.json()["interval"] == "year"
        assert changed.json()["stripe_subscription_id"] == sub["stripe_subscription_id"]  # the same one, changed

        assert client.delete(url, headers=admin).status_code == 204
        assert client.get(url, headers=admin).json() == {
            "tenant_id": "acme",
            "plan": "free",
            "subscription": None,
            "payment": None,
        }
        assert client.delete(url, headers=admin).status_code == 404
    customer = conn.execute("SELECT stripe_customer_id FROM tenants WHERE id = 'acme'").fetchone()[0]
    assert customer.startswith("cus_")  # made when it first subscribed
    actions = [
        r[0] for r in conn.execute("SELECT action FROM audit_log WHERE action LIKE 'billing.%' ORDER BY id").fetchall()
    ]
    assert actions == ["billing.subscription.create", "billing.subscription.change", "billing.subscription.cancel"]


class RecordingProxy:
    """A reverse proxy in front of stripe-mock that keeps what each request sent (stripe-mock keeps nothing)."""

    def __init__(self, upstream: str) -> None:
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path, parse_qs(body.decode(), keep_blank_values=True)))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path, content=body, headers=headers)
                self.send_response(answer.status_code)
                for k, v in answer.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_renamed_tenant_is_renamed_at_stripe_and_the_sync_catches_up_after_an_outage(
    settings: Settings, conn: psycopg.Connection, billing: Callable[..., Result], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    assert settings.stripe_api_base
    proxy = RecordingProxy(settings.stripe_api_base)
    admin = make_tenant(conn, "acme", [], role="tenant_admin")
    conn.commit()
    try:
        through = settings.model_copy(update={"kafka_bootstrap": None, "stripe_api_base": proxy.url})
        assert provision_customer(through, "acme")
        (customer,) = conn.execute("SELECT stripe_customer_id FROM tenants WHERE id = 'acme'").fetchone()
        conn.commit()
        with TestClient(create_app(through)) as client:
            renamed = client.patch("/api/tenants/acme", json={"name": "ACME Presses"}, headers={"X-API-Key": admin})
            assert renamed.status_code == 200, renamed.text
            branded = client.put("/api/tenants/acme/branding", json={"primary_color": "#112233"},
                                 headers={"X-API-Key": admin})  # fmt: skip
            assert branded.status_code == 200
        sent = [(m, p, form) for m, p, form in proxy.requests if p.startswith("/v1/customers/")]
        assert sent == [
            ("POST", f"/v1/customers/{customer}",
             {"name": ["ACME Presses"], "metadata[tenant_id]": ["acme"], "metadata[parent_tenant_id]": [""]})
        ]  # fmt: skip  # one update: the branding change sent nothing

        down = settings.model_copy(update={"kafka_bootstrap": None, "stripe_api_base": "http://127.0.0.1:9"})
        with TestClient(create_app(down)) as client:
            again = client.patch("/api/tenants/acme", json={"name": "ACME Works"}, headers={"X-API-Key": admin})
            assert again.status_code == 200 and again.json()["name"] == "ACME Works"
        assert "renamed here but not yet at Stripe" in caplog.text and "sync-customers --update" in caplog.text

        proxy.requests.clear()
        monkeypatch.setenv("SENSORMINE_STRIPE_API_BASE", proxy.url)
        reset_settings()
        done = billing("sync-customers", "--update")
        assert done.exit_code == 0 and "customers: 0 created, 1 updated, 0 already at Stripe" in done.output, (
            done.output
        )
        assert [(p, form["name"]) for m, p, form in proxy.requests if m == "POST"] == [
            (f"/v1/customers/{customer}", ["ACME Works"])
        ]
    finally:
        proxy.close()


def test_a_tenant_admin_collects_attaches_lists_and_detaches_payment_methods(
    settings: Settings, conn: psycopg.Connection
) -> None:
    assert settings.stripe_api_base
    proxy = RecordingProxy(settings.stripe_api_base)
    admin = {"X-API-Key": make_tenant(conn, "acme", [], role="tenant_admin")}
    viewer = {"X-API-Key": create_api_key(conn, "acme", "viewer", role="viewer")}
    conn.commit()
    url = "/api/billing/payment-methods"
    try:
        through = settings.model_copy(update={"kafka_bootstrap": None, "stripe_api_base": proxy.url})
        with TestClient(create_app(through)) as client:
            intent = client.post("/api/billing/setup-intent", headers=admin)
            assert intent.status_code == 200 and intent.json()["client_secret"].startswith("seti_"), intent.text
            (customer,) = conn.execute("SELECT stripe_customer_id FROM tenants WHERE id = 'acme'").fetchone()
            conn.commit()
            assert customer  # made on the way
            visa = client.post(url, json={"payment_method": "pm_card_visa"}, headers=admin)
            assert visa.status_code == 201, visa.text
            assert {k: visa.json()[k] for k in ("brand", "last4", "is_default")} == {
                "brand": "visa", "last4": "4242", "is_default": True
            }  # fmt: skip
            second = client.post(url, json={"payment_method": "pm_card_mastercard"}, headers=admin)
            assert second.status_code == 201
            listed = client.get(url, headers=admin).json()
            assert [(m["stripe_payment_method_id"], m["is_default"]) for m in listed] == [
                ("pm_card_mastercard", True), ("pm_card_visa", False)
            ]  # fmt: skip
            assert client.post(url, json={"payment_method": "pm_card_visa"}, headers=viewer).status_code == 403
            assert client.delete(f"{url}/pm_card_visa", headers=admin).status_code == 204
            assert client.delete(f"{url}/pm_card_visa", headers=admin).status_code == 404
            assert [m["stripe_payment_method_id"] for m in client.get(url, headers=admin).json()] == [
                "pm_card_mastercard"
            ]
        sent = [(m, p, form) for m, p, form in proxy.requests if m == "POST"]
        assert ("POST", "/v1/payment_methods/pm_card_visa/attach", {"customer": [customer]}) in sent
        assert ("POST", "/v1/payment_methods/pm_card_visa/detach", {}) in sent
        defaults = [f["invoice_settings[default_payment_method]"] for m, p, f in proxy.requests
                    if p == f"/v1/customers/{customer}"]  # fmt: skip
        assert defaults == [["pm_card_visa"], ["pm_card_mastercard"]]
    finally:
        proxy.close()
    actions = [
        a for (a,) in conn.execute("SELECT action FROM audit_log WHERE action LIKE 'billing.payment%' ORDER BY id")
    ]
    assert actions == ["billing.payment_method.add", "billing.payment_method.add", "billing.payment_method.remove"]
