"""Invoice previews: the plan's price, overage per started block beyond the allowance, lines that add up."""

from datetime import date
from decimal import Decimal

from sensormine.billing.invoice_preview import build_preview

MONTH = date(2026, 11, 1)


def _amounts(lines: list[dict]) -> dict[str, Decimal | None]:
    return {line.get("resource", line["item"]): (Decimal(line["amount"]) if line["amount"] else None) for line in lines}


def test_pro_overage_is_charged_per_started_block_and_the_total_is_the_sum_of_the_lines() -> None:
    usage = {"api_calls": Decimal(1_000_001), "active_devices": Decimal(103), "storage_gb_month": Decimal("50.5"),
             "ml_inference": Decimal(2_500), "data_ingested": Decimal(100 * 10**9 + 1),
             "data_egress": Decimal(52 * 10**9)}  # fmt: skip
    preview = build_preview("acme", MONTH, "pro", "month", usage)
    amounts = _amounts(preview.lines)
    assert amounts == {
        "plan": Decimal("99"),
        "api_calls": Decimal("0.50"),  # one call beyond the million starts a block of 1,000
        "active_devices": Decimal("3.00"),
        "storage_gb_month": Decimal("0.10"),  # half a GB-month starts a GB
        "ml_inference": Decimal("0.60"),  # 2,500 inferences: three started blocks of 1,000
        "data_ingested": Decimal("0.05"),  # one byte beyond 100 GB starts a GB
        "data_egress": Decimal("0.18"),  # 2 GB beyond 50
    }
    assert preview.total == sum(a for a in amounts.values() if a is not None) == Decimal("103.43")
    assert preview.currency == "usd"


def test_within_the_allowance_a_pro_month_costs_the_plan_and_a_yearly_plan_shows_its_twelfth() -> None:
    usage = {"api_calls": Decimal(999_000), "active_devices": Decimal(100)}
    assert build_preview("acme", MONTH, "pro", "month", usage).total == Decimal("99")
    assert build_preview("acme", MONTH, "pro", "year", usage).total == Decimal("82.50")


def test_free_has_no_overage_and_enterprise_lists_usage_without_amounts() -> None:
    free = build_preview("acme", MONTH, "free", None, {"api_calls": Decimal(50_000)})
    assert free.total == Decimal(0) and _amounts(free.lines) == {"plan": Decimal(0)}
    enterprise = build_preview("acme", MONTH, "enterprise", None, {"api_calls": Decimal(5)})
    assert enterprise.total is None and _amounts(enterprise.lines) == {"api_calls": None}
