"""Chargeback: every strategy's allocations add up to the invoice to the cent (largest remainders)."""

from datetime import date
from decimal import Decimal

import pytest

from sensormine.billing.chargeback import ChargebackError, allocate, check_policy, split_exactly
from sensormine.billing.invoice_preview import build_preview

D = Decimal
MEMBERS = ["acme", "acme-east", "acme-west"]
USAGE = {
    "acme": {"api_calls": D(400_000), "active_devices": D(10), "readings": D(1)},
    "acme-east": {"api_calls": D(500_000), "active_devices": D(50), "readings": D(1)},
    "acme-west": {"api_calls": D(300_000), "active_devices": D(60), "readings": D(1)},
}
# 1.2 M calls: 200 blocks of 1,000 beyond the million ($100); 120 devices: 20 beyond 100 ($20).
PREVIEW = build_preview("acme", date(2026, 11, 1), "pro", "month",
                        {"api_calls": D(1_200_000), "active_devices": D(120), "readings": D(3)})  # fmt: skip


def _amounts(strategy: str, shares: dict[str, Decimal] | None = None) -> dict[str, Decimal]:
    return {a.tenant_id: a.amount for a in allocate(PREVIEW, strategy, shares or {}, USAGE)}


def test_the_preview_is_the_plan_and_two_overage_lines() -> None:
    assert PREVIEW.total == D("219.00")


def test_split_exactly_adds_up_and_gives_left_over_cents_to_the_largest_remainders() -> None:
    thirds = split_exactly(D("100.00"), {"a": D(1), "b": D(1), "c": D(1)}, "a")
    assert thirds == {"a": D("33.34"), "b": D("33.33"), "c": D("33.33")}  # tie broken by id
    assert split_exactly(D("10.00"), {"a": D(0), "b": D(0)}, "payer") == {"payer": D("10.00")}
    odd = split_exactly(D("0.05"), {"a": D(2), "b": D(1), "c": D(1)}, "a")
    assert sum(odd.values()) == D("0.05") and odd == {"a": D("0.03"), "b": D("0.01"), "c": D("0.01")}


def test_direct_charges_each_overage_by_own_use_and_the_plan_to_the_payer() -> None:
    got = _amounts("direct")
    # calls $100 split 4:5:3; devices $20 split 10:50:60; the $99 plan stays with acme.
    assert got == {"acme": D("99") + D("33.33") + D("1.67"), "acme-east": D("41.67") + D("8.33"),
                   "acme-west": D("25.00") + D("10.00")}  # fmt: skip
    assert sum(got.values()) == PREVIEW.total


def test_proportional_fixed_and_showback_add_up_to_the_cent() -> None:
    devices = _amounts("proportional_devices")
    assert devices == {"acme": D("18.25"), "acme-east": D("91.25"), "acme-west": D("109.50")}
    readings = _amounts("proportional_readings")
    assert readings == {"acme": D("73.00"), "acme-east": D("73.00"), "acme-west": D("73.00")}
    percent = _amounts("fixed_percent", {"acme-east": D("33.3"), "acme-west": D("33.3")})
    assert percent == {"acme": D("73.14"), "acme-east": D("72.93"), "acme-west": D("72.93")}
    amounts = _amounts("fixed_amount", {"acme-east": D("50"), "acme-west": D("19.99")})
    assert amounts == {"acme": D("149.01"), "acme-east": D("50.00"), "acme-west": D("19.99")}
    assert _amounts("showback") == _amounts("direct")
    for got in (devices, readings, percent, amounts):
        assert sum(got.values()) == PREVIEW.total


def test_policies_that_cannot_add_up_or_name_strangers_are_refused() -> None:
    with pytest.raises(ChargebackError, match="more than 100"):
        check_policy("fixed_percent", {"acme-east": 60, "acme-west": 41}, MEMBERS)
    with pytest.raises(ChargebackError, match="not billed with this tenant"):
        check_policy("fixed_amount", {"globex": 5}, MEMBERS)
    with pytest.raises(ChargebackError, match="takes no shares"):
        check_policy("direct", {"acme-east": 5}, MEMBERS)
    with pytest.raises(ChargebackError, match="needs shares"):
        check_policy("fixed_amount", {}, MEMBERS)
    with pytest.raises(ChargebackError, match="more than the invoice"):
        allocate(PREVIEW, "fixed_amount", {"acme-east": D("300")}, USAGE)
    enterprise = build_preview("acme", date(2026, 11, 1), "enterprise", None, {})
    with pytest.raises(ChargebackError, match="per contract"):
        allocate(enterprise, "direct", {}, USAGE)
