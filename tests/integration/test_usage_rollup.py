"""The usage assets through Dagster on PostgreSQL, the lake and stripe-mock: `usage_daily` counts each
tenant-day from the usage ledger and the lake (checked against what the test wrote), measures storage
for recent days only, and is replaced on re-runs; `stripe_usage_report` sends each closed day's meter
events once (seen by a recording proxy in front of stripe-mock) and skips what it may not send."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from fastapi.testclient import TestClient

from assets.telemetry import telemetry_lake, telemetry_partition_key
from assets.usage import (
    invoice_preview,
    month_partition_key,
    stripe_usage_report,
    usage_daily,
    usage_daily_matches_in_both_stores,
    usage_monthly,
    usage_monthly_equals_daily_sums,
)
from lake.storage import read_partition
from lake.usage import TABLE_NAME, USAGE_SCHEMA
from orchestration.resources import StripeResource, resources_for
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import ensure_partition_window
from sensormine.identity.api_keys import create_api_key
from sensormine.reading import Reading, datetime_to_us
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant
from tests.integration.test_billing_stripe import RecordingProxy

pytestmark = pytest.mark.integration

TODAY = datetime.now(UTC).date()
OLD = TODAY - timedelta(days=3)  # closed, within Stripe's 35 days, too old to measure storage now
YESTERDAY = TODAY - timedelta(days=1)


def day_readings(tenant_id: str, devices: list[str], day: date, n: int) -> list[Reading]:
    start = datetime_to_us(datetime(day.year, day.month, day.day, tzinfo=UTC))
    return [Reading(tenant_id, d, "temp", start + i * 1_000_000, float(i), 0, start) for d in devices for i in range(n)]


@pytest.fixture
def world(conn: psycopg.Connection, settings: Settings) -> Iterator[tuple[dg.DagsterInstance, dict[str, Any]]]:
    """acme (3 devices, 2 of them reporting; a Stripe customer) and globex (no customer), readings of two
    days in the lake, and the usage ledger's counts of the older day."""
    for day in (OLD, YESTERDAY):
        ensure_partition_window(conn, day, settings)
    make_tenant(conn, "acme", ["d1", "d2", "idle"])
    make_tenant(conn, "globex", ["g1"])
    conn.execute("UPDATE tenants SET stripe_customer_id = 'cus_acme' WHERE id = 'acme'")
    writer = HotStoreWriter(conn)
    writer.write(day_readings("acme", ["d1", "d2"], OLD, 30) + day_readings("globex", ["g1"], OLD, 5))
    writer.write(day_readings("acme", ["d1"], YESTERDAY, 10))
    conn.execute(
        "INSERT INTO usage (tenant_id, metric, day, value) VALUES "
        "('acme', 'api_calls', %(d)s, 1234), ('acme', 'ml_inference', %(d)s, 56), ('globex', 'api_calls', %(d)s, 7)",
        {"d": OLD},
    )
    conn.commit()
    resources = resources_for(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme", "globex"])
        for tenant, day in (("acme", OLD), ("globex", OLD), ("acme", YESTERDAY)):
            key = telemetry_partition_key(tenant, day)
            assert dg.materialize([telemetry_lake], partition_key=key, resources=resources, instance=instance).success
        yield instance, resources


def _roll_up(world: tuple[dg.DagsterInstance, dict[str, Any]], tenant: str, day: date) -> dg.ExecuteInProcessResult:
    instance, resources = world
    result = dg.materialize(
        [usage_daily, usage_daily_matches_in_both_stores],
        partition_key=telemetry_partition_key(tenant, day),
        resources=resources,
        instance=instance,
    )
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.passed, check.metadata
    return result


def _usage(conn: psycopg.Connection, tenant: str, day: date) -> dict[str, Decimal]:
    rows = conn.execute(
        "SELECT resource, quantity FROM usage_daily WHERE tenant_id = %s AND day = %s", (tenant, day)
    ).fetchall()
    conn.commit()
    return dict(rows)


def _lake_files_bytes(lake: Path, tenant: str) -> int:
    return sum(f.stat().st_size for f in (lake / "telemetry" / f"tenant_id={tenant}").rglob("*.parquet"))


def test_usage_daily_counts_the_ledger_and_the_lake_and_is_replaced_on_rerun(
    world: tuple[dg.DagsterInstance, dict[str, Any]], conn: psycopg.Connection, settings: Settings
) -> None:
    _roll_up(world, "acme", OLD)
    expected = {"api_calls": 1234, "ml_inference": 56, "readings": 60, "active_devices": 2}  # "idle" sent nothing
    assert _usage(conn, "acme", OLD) == expected  # no storage: that day was not measured when it was recent
    delta = read_partition(settings, TABLE_NAME, USAGE_SCHEMA, "acme", OLD, sort_by=["resource"]).to_pylist()
    assert {r["resource"]: r["quantity"] for r in delta} == expected
    assert {r["unit"] for r in delta if r["resource"] in ("api_calls", "ml_inference")} == {"calls"}

    conn.execute("UPDATE usage SET value = 2000 WHERE tenant_id = 'acme' AND metric = 'api_calls'")
    conn.commit()
    _roll_up(world, "acme", OLD)  # the ledger grew (a late flush): the day is replaced, never added to
    assert _usage(conn, "acme", OLD) == {**expected, "api_calls": 2000}
    again = read_partition(settings, TABLE_NAME, USAGE_SCHEMA, "acme", OLD).to_pylist()
    assert len(again) == len(expected) and {r["resource"]: r["quantity"] for r in again}["api_calls"] == 2000

    _roll_up(world, "globex", OLD)
    assert _usage(conn, "globex", OLD) == {"api_calls": 7, "readings": 5, "active_devices": 1}

    # The API reads the rollup under the caller's tenancy.
    admin = {"X-API-Key": create_api_key(conn, "acme", "billing", role="tenant_admin")}
    conn.commit()
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as client:
        window = {"start": str(OLD), "end": str(TODAY)}
        got = client.get("/api/billing/usage", params=window, headers=admin)
        assert got.status_code == 200, got.text
        body = got.json()
        assert {d["resource"]: Decimal(d["quantity"]) for d in body["days"]} == {**expected, "api_calls": 2000}
        assert {k: Decimal(v) for k, v in body["totals"].items()} == {"api_calls": 2000, "ml_inference": 56,
                                                                      "readings": 60, "data_ingested": 0,
                                                                      "data_egress": 0}  # fmt: skip
        other = client.get("/api/billing/usage", params={**window, "tenant_id": "globex"}, headers=admin)
        assert other.status_code == 404
        backwards = client.get("/api/billing/usage", params={"start": str(TODAY), "end": str(OLD)}, headers=admin)
        assert backwards.status_code == 422


def test_storage_is_measured_for_a_recent_day_and_kept_by_later_reruns(
    world: tuple[dg.DagsterInstance, dict[str, Any]], conn: psycopg.Connection, settings: Settings
) -> None:
    result = _roll_up(world, "acme", YESTERDAY)
    [mat] = result.asset_materializations_for_node("billing__usage_daily")
    assert mat.metadata["storage_measured_now"].value is True
    (hot,) = conn.execute("SELECT sum(pg_column_size(t.*)) FROM telemetry t WHERE tenant_id = 'acme'").fetchone()
    conn.commit()
    lake = _lake_files_bytes(Path(settings.lake_root), "acme")
    assert hot > 0 and lake > 0
    assert _usage(conn, "acme", YESTERDAY) == {"readings": 10, "active_devices": 1, "storage": hot + lake}
    snapshot = conn.execute(
        "SELECT devices, hot_bytes, lake_bytes FROM tenant_usage_snapshots WHERE tenant_id = 'acme'"
    ).fetchall()
    conn.commit()
    assert snapshot == [(3, hot, lake)]


def test_closed_days_are_reported_to_stripe_once_and_the_rest_is_skipped_with_a_reason(
    world: tuple[dg.DagsterInstance, dict[str, Any]], conn: psycopg.Connection, settings: Settings
) -> None:
    if not settings.stripe_api_base:
        pytest.skip("needs stripe-mock (sensormine services up)")
    instance, resources = world
    for tenant in ("acme", "globex"):
        _roll_up(world, tenant, OLD)
    proxy = RecordingProxy(settings.stripe_api_base)
    resources = {**resources, "stripe": StripeResource(api_key=settings.stripe_api_key, api_base=proxy.url)}

    def report(tenant: str, day: date) -> dict[str, Any]:
        result = dg.materialize(
            [stripe_usage_report], partition_key=telemetry_partition_key(tenant, day), resources=resources,
            instance=instance,
        )  # fmt: skip
        assert result.success
        [mat] = result.asset_materializations_for_node("billing__stripe_usage_report")
        return {k: v.value for k, v in mat.metadata.items()}

    try:
        first = report("acme", OLD)
        sent = [form for m, p, form in proxy.requests if (m, p) == ("POST", "/v1/billing/meter_events")]
        stamp = str(int(datetime(OLD.year, OLD.month, OLD.day, 23, 59, 59, tzinfo=UTC).timestamp()))
        assert sorted(sent, key=lambda f: f["event_name"]) == [
            {"event_name": ["sensormine_api_calls"], "identifier": [f"sensormine:acme:api_calls:{OLD}"],
             "timestamp": [stamp], "payload[stripe_customer_id]": ["cus_acme"], "payload[value]": ["1234"]},
            {"event_name": ["sensormine_ml_inference"], "identifier": [f"sensormine:acme:ml_inference:{OLD}"],
             "timestamp": [stamp], "payload[stripe_customer_id]": ["cus_acme"], "payload[value]": ["56"]},
        ]  # fmt: skip
        assert (first["sent"], first["already_sent"], first["skipped"]) == (2, 0, "")

        proxy.requests.clear()
        again = report("acme", OLD)  # a re-run or a backfill over the same day
        assert (again["sent"], again["already_sent"]) == (0, 2) and proxy.requests == []
        ledger = conn.execute(
            "SELECT identifier, resource, value FROM stripe_meter_events WHERE tenant_id = 'acme' ORDER BY 1"
        ).fetchall()
        conn.commit()
        assert ledger == [
            (f"sensormine:acme:api_calls:{OLD}", "api_calls", 1234),
            (f"sensormine:acme:ml_inference:{OLD}", "ml_inference", 56),
        ]

        # A late ledger flush grows the day: the difference is topped up under a new identifier.
        conn.execute("UPDATE usage SET value = 1300 WHERE tenant_id = 'acme' AND metric = 'api_calls'")
        conn.commit()
        _roll_up(world, "acme", OLD)
        proxy.requests.clear()
        grown = report("acme", OLD)
        assert grown["sent"] == 1 and grown["canceled"] == ""
        (topped,) = [f for m, p, f in proxy.requests if p == "/v1/billing/meter_events"]
        assert (topped["identifier"], topped["payload[value]"]) == ([f"sensormine:acme:api_calls:{OLD}:r1"], ["66"])
        # A correction downwards within 24 hours: both events are cancelled and the new count sent.
        conn.execute("UPDATE usage SET value = 1000 WHERE tenant_id = 'acme' AND metric = 'api_calls'")
        conn.commit()
        _roll_up(world, "acme", OLD)
        proxy.requests.clear()
        shrunk = report("acme", OLD)
        cancels = [
            f["cancel[identifier]"][0] for m, p, f in proxy.requests if p == "/v1/billing/meter_event_adjustments"
        ]
        assert cancels == [f"sensormine:acme:api_calls:{OLD}", f"sensormine:acme:api_calls:{OLD}:r1"]
        (resent,) = [f for m, p, f in proxy.requests if p == "/v1/billing/meter_events"]
        assert (resent["identifier"], resent["payload[value]"]) == ([f"sensormine:acme:api_calls:{OLD}:r2"], ["1000"])
        assert shrunk["sent"] == 1
        # Later than Stripe may cancel: nothing is sent, and the report says what is over-reported.
        conn.execute("UPDATE stripe_meter_events SET sent_at = now() - interval '2 days'")
        conn.execute("UPDATE usage SET value = 900 WHERE tenant_id = 'acme' AND metric = 'api_calls'")
        conn.commit()
        _roll_up(world, "acme", OLD)
        proxy.requests.clear()
        late = report("acme", OLD)
        assert late["sent"] == 0 and proxy.requests == []
        assert "api_calls: 1000 reported, 900 now" in late["overreported"]

        assert "not over yet" in report("acme", TODAY)["skipped"]
        assert "older than Stripe accepts" in report("acme", TODAY - timedelta(days=40))["skipped"]
        assert "no Stripe customer" in report("globex", OLD)["skipped"]
        assert proxy.requests == []
    finally:
        proxy.close()


def test_a_month_sums_its_days_counts_devices_once_and_is_priced_in_its_preview(
    world: tuple[dg.DagsterInstance, dict[str, Any]], conn: psycopg.Connection, settings: Settings
) -> None:
    instance, resources = world
    month = OLD.replace(day=1)
    days = [d for d in (OLD, YESTERDAY) if d.replace(day=1) == month]  # both, unless a month began between
    for day in days:
        _roll_up(world, "acme", day)
    result = dg.materialize(
        [usage_monthly, usage_monthly_equals_daily_sums, invoice_preview],
        partition_key=month_partition_key("acme", month), resources=resources, instance=instance,
    )  # fmt: skip
    assert result.success
    [check] = result.get_asset_check_evaluations()
    assert check.passed, check.metadata
    rows = dict(
        conn.execute("SELECT resource, quantity FROM usage_monthly WHERE tenant_id = 'acme' AND month = %s", (month,))
    )
    conn.commit()
    expected: dict[str, Any] = {"api_calls": 1234, "ml_inference": 56, "readings": 60, "active_devices": 2}
    if YESTERDAY in days:  # d1 reported on both days: still two devices
        (held,) = conn.execute(
            "SELECT hot_bytes + lake_bytes FROM tenant_usage_snapshots WHERE tenant_id = 'acme'"
        ).fetchone()
        conn.commit()
        expected |= {"readings": 70, "storage_gb_month": (Decimal(held) / 10**9).quantize(Decimal("0.000001"))}
    assert rows == expected

    # Pro: $99, API calls within the million, 56 inferences = one started block of 1,000 at $0.20.
    stored = conn.execute(
        "SELECT plan, currency, total, lines FROM invoice_previews WHERE tenant_id = 'acme' AND month = %s", (month,)
    ).fetchone()
    conn.commit()
    assert stored is not None and stored[:3] == ("pro", "usd", Decimal("99.20"))
    amounts = {line.get("resource", line["item"]): Decimal(line["amount"]) for line in stored[3]}
    assert amounts == {"plan": Decimal("99"), "api_calls": 0, "active_devices": 0, "storage_gb_month": 0,
                       "ml_inference": Decimal("0.20"), "data_ingested": 0, "data_egress": 0}  # fmt: skip
    assert sum(amounts.values()) == stored[2]

    admin = {"X-API-Key": create_api_key(conn, "acme", "billing", role="tenant_admin")}
    conn.commit()
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as client:
        live = client.get("/api/billing/invoice-preview", params={"month": f"{month:%Y-%m}"}, headers=admin)
        assert live.status_code == 200, live.text
        assert Decimal(live.json()["total"]) == stored[2] and live.json()["lines"] == stored[3]
        assert client.get("/api/billing/invoice-preview", params={"month": "2026-13"}, headers=admin).status_code == 422


def test_storage_near_and_past_the_plans_limit_raises_one_event_each_per_month(
    world: tuple[dg.DagsterInstance, dict[str, Any]], conn: psycopg.Connection
) -> None:
    instance, _ = world
    make_tenant(conn, "tiny", [], plan="free")  # 1 GB of storage for the quota group
    make_tenant(conn, "tiny-lab", [], parent_id="tiny")  # shares it
    # What the sub-tenant's own run measured yesterday: most of the gigabyte.
    conn.execute(
        "INSERT INTO tenant_usage_snapshots (tenant_id, day, devices, hot_bytes, lake_bytes) "
        "VALUES ('tiny-lab', %s, 0, 800000000, 50000000)",
        (YESTERDAY,),
    )
    conn.commit()
    instance.add_dynamic_partitions("tenants", ["tiny"])

    def events() -> list[tuple[str, int]]:
        rows = conn.execute(
            "SELECT type, (data->>'used')::bigint FROM tenant_events WHERE tenant_id = 'tiny' ORDER BY id"
        ).fetchall()
        conn.commit()
        return rows

    first = _roll_up(world, "tiny", YESTERDAY)
    [mat] = first.asset_materializations_for_node("billing__usage_daily")
    assert mat.metadata["quota_events"].value == "quota.storage.warning"
    ((kind, used),) = events()
    assert kind == "quota.storage.warning" and used >= 850_000_000  # the group's bytes: tiny's own are tiny
    _roll_up(world, "tiny", YESTERDAY)
    assert len(events()) == 1  # once a month

    conn.execute("UPDATE tenant_usage_snapshots SET hot_bytes = 1200000000 WHERE tenant_id = 'tiny-lab'")
    conn.commit()
    _roll_up(world, "tiny", YESTERDAY)
    assert [k for k, _ in events()] == ["quota.storage.warning", "quota.storage.exceeded"]
