"""Chargeback through the API on PostgreSQL: a parent chooses a strategy, its month's invoice preview is
allocated to it and its sub-tenants (JSON and CSV), always adding up to the cent; refusals say why."""

from __future__ import annotations

import csv
import io
from datetime import date
from decimal import Decimal

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.identity.api_keys import create_api_key
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant

pytestmark = pytest.mark.integration
MONTH = date(2026, 11, 1)
URL = "/api/billing/allocations"


@pytest.fixture
def client(settings: Settings, conn: psycopg.Connection) -> TestClient:
    make_tenant(conn, "acme", [])
    make_tenant(conn, "acme-east", [], parent_id="acme")
    make_tenant(conn, "acme-west", [], parent_id="acme")
    make_tenant(conn, "acme-lab", [], parent_id="acme", plan="pro")  # its own plan: billed on its own
    for tenant, calls, devices in (("acme", 400_000, 10), ("acme-east", 500_000, 50), ("acme-west", 300_000, 60),
                                   ("acme-lab", 9_000_000, 500)):  # fmt: skip
        conn.execute(
            "INSERT INTO usage_monthly (tenant_id, month, resource, quantity, unit) VALUES "
            "(%(t)s, %(m)s, 'api_calls', %(c)s, 'calls'), (%(t)s, %(m)s, 'active_devices', %(d)s, 'devices')",
            {"t": tenant, "m": MONTH, "c": calls, "d": devices},
        )
    conn.commit()
    return TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None})))


def _key(conn: psycopg.Connection, tenant: str, role: str = "tenant_admin") -> dict[str, str]:
    key = create_api_key(conn, tenant, role, role=role)
    conn.commit()
    return {"X-API-Key": key}


def test_a_parent_allocates_its_invoice_by_each_strategy_and_the_parts_add_up(
    client: TestClient, conn: psycopg.Connection
) -> None:
    admin = _key(conn, "acme")
    with client:
        preview = client.get("/api/billing/invoice-preview", params={"month": "2026-11"}, headers=admin).json()
        assert Decimal(preview["total"]) == Decimal("219.00")  # $99 + $100 calls + $20 devices; acme-lab not in it
        assert client.get("/api/billing/allocation-policy", headers=admin).json()["strategy"] == "direct"

        def report(strategy: str, shares: dict | None = None) -> dict[str, Decimal]:
            put = client.put("/api/billing/allocation-policy", json={"strategy": strategy, "shares": shares or {}},
                             headers=admin)  # fmt: skip
            assert put.status_code == 200, put.text
            got = client.get(URL, params={"month": "2026-11"}, headers=admin)
            assert got.status_code == 200, got.text
            body = got.json()
            parts = {a["tenant_id"]: Decimal(a["amount"]) for a in body["allocations"]}
            assert sum(parts.values()) == Decimal(body["total"]) == Decimal("219.00")
            assert body["billed"] is (strategy != "showback")
            return parts

        assert report("direct") == {"acme": Decimal("134.00"), "acme-east": Decimal("50.00"),
                                    "acme-west": Decimal("35.00")}  # fmt: skip
        assert report("proportional_devices") == {"acme": Decimal("18.25"), "acme-east": Decimal("91.25"),
                                                  "acme-west": Decimal("109.50")}  # fmt: skip
        assert report("fixed_percent", {"acme-east": 50})["acme-east"] == Decimal("109.50")
        assert report("fixed_amount", {"acme-west": "10.01"}) == {"acme": Decimal("208.99"), "acme-east": 0,
                                                                  "acme-west": Decimal("10.01")}  # fmt: skip
        report("showback")

        exported = client.get(URL, params={"month": "2026-11", "format": "csv"}, headers=admin)
        assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert [r["tenant_id"] for r in rows] == ["acme", "acme-east", "acme-west", "total"]
        assert sum(Decimal(r["amount"]) for r in rows[:-1]) == Decimal(rows[-1]["amount"]) == Decimal("219.00")
        assert {r["billed"] for r in rows} == {"false"}

    audit = conn.execute(
        "SELECT detail->>'strategy' FROM audit_log WHERE action = 'billing.allocation.set' ORDER BY id"
    ).fetchall()
    conn.commit()
    assert [a for (a,) in audit] == ["direct", "proportional_devices", "fixed_percent", "fixed_amount", "showback"]


def test_refusals_say_why(client: TestClient, conn: psycopg.Connection) -> None:
    admin, east, viewer = _key(conn, "acme"), _key(conn, "acme-east"), _key(conn, "acme", "viewer")
    with client:
        put = "/api/billing/allocation-policy"
        over = client.put(put, json={"strategy": "fixed_percent", "shares": {"acme-east": 60, "acme-west": 41}},
                          headers=admin)  # fmt: skip
        assert over.status_code == 422 and "more than 100" in over.json()["detail"]
        lab = client.put(put, json={"strategy": "fixed_amount", "shares": {"acme-lab": 5}}, headers=admin)
        assert lab.status_code == 422 and "acme-lab" in lab.json()["detail"]  # it pays its own invoice
        assert client.put(put, json={"strategy": "direct"}, headers=viewer).status_code == 403
        billed_with = client.get(URL, params={"month": "2026-11"}, headers=east)
        assert billed_with.status_code == 409 and "billed with 'acme'" in billed_with.json()["detail"]
        own = client.get(URL, params={"month": "2026-11", "tenant_id": "acme-lab"}, headers=admin)
        assert own.status_code == 200 and [a["tenant_id"] for a in own.json()["allocations"]] == ["acme-lab"]
