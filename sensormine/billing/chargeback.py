"""Sub-tenant chargeback: a paying tenant's monthly invoice allocated to itself and the sub-tenants that
share its plan, by the strategy it chose (docs/billing.md, "Chargeback").

Strategies:

- `direct`: each overage line goes to the members in proportion to their own use of that resource;
  the plan's price stays with the payer;
- `proportional_devices` / `proportional_readings`: the whole invoice in proportion to the month's
  active devices / readings (data volume);
- `fixed_percent`: given percentages of the invoice (at most 100 in all), the payer keeps the rest;
- `fixed_amount`: given amounts (at most the invoice), the payer keeps the rest;
- `showback`: the `direct` figures, reported and not billed (`billed` false): the payer pays all.

Allocations always add up to the invoice to the cent: each share is computed exactly, rounded down
to the cent, and the cents left over go one by one to the largest remainders (ties: tenant id),
the largest-remainder method. When nothing measures a proportion (no devices, no readings, no
overage), the amount stays with the payer.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_DOWN, Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sensormine.audit import log as audit
from sensormine.billing.invoice_preview import CENT, Preview, member_usage, preview_month, quota_members
from sensormine.metering.records import ACTIVE_DEVICES, READINGS

STRATEGIES = ("direct", "proportional_devices", "proportional_readings", "fixed_percent", "fixed_amount", "showback")


class ChargebackError(ValueError):
    """A policy or report that cannot be had (the message says why)."""


@dataclass(frozen=True)
class Allocation:
    """One member's part of the invoice."""

    tenant_id: str
    amount: Decimal
    basis: str  # what the share was computed from


@dataclass(frozen=True)
class AllocationReport:
    """A month's invoice of a payer, allocated."""

    tenant_id: str
    month: date
    strategy: str
    billed: bool
    currency: str
    total: Decimal
    allocations: list[Allocation]


def split_exactly(total: Decimal, weights: Mapping[str, Decimal], fallback: str) -> dict[str, Decimal]:
    """`total` (in cents) split in proportion to `weights`, adding up exactly (largest remainders);
    all of it to `fallback` when the weights are all zero."""
    weighted = {k: w for k, w in weights.items() if w > 0}
    if not weighted or total == 0:
        return {fallback: total}
    whole = sum(weighted.values())
    exact = {k: total * w / whole for k, w in weighted.items()}
    floors = {k: v.quantize(CENT, ROUND_DOWN) for k, v in exact.items()}
    left = int(((total - sum(floors.values())) / CENT).to_integral_value())
    for k in sorted(exact, key=lambda k: (-(exact[k] - floors[k]), k))[:left]:
        floors[k] += CENT
    return floors


def check_policy(strategy: str, shares: Mapping[str, Any], members: list[str]) -> dict[str, Decimal]:
    """The policy's shares as Decimals, after checking them (ChargebackError saying what is wrong)."""
    if strategy not in STRATEGIES:
        raise ChargebackError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    fixed = strategy in ("fixed_percent", "fixed_amount")
    if shares and not fixed:
        raise ChargebackError(f"{strategy} takes no shares (only fixed_percent and fixed_amount do)")
    strangers = sorted(set(shares) - set(members))
    if strangers:
        raise ChargebackError(f"not billed with this tenant (own plan, or not a sub-tenant): {', '.join(strangers)}")
    try:
        values = {k: Decimal(str(v)) for k, v in shares.items()}
    except ArithmeticError:
        raise ChargebackError("shares must be numbers") from None
    if any(v < 0 for v in values.values()):
        raise ChargebackError("shares must not be negative")
    if strategy == "fixed_percent" and sum(values.values()) > 100:
        raise ChargebackError(f"percentages add up to {sum(values.values())}, more than 100")
    if fixed and not values:
        raise ChargebackError(
            f"{strategy} needs shares: {{tenant id: {'percent' if 'percent' in strategy else 'USD'}}}"
        )
    return values


def allocate(
    preview: Preview, strategy: str, shares: Mapping[str, Decimal], usage: Mapping[str, Mapping[str, Decimal]]
) -> list[Allocation]:
    """The allocations of `preview`'s total among `usage`'s members (the payer is `preview.tenant_id`)."""
    if preview.total is None:
        raise ChargebackError("the invoice is priced per contract (enterprise): there is no total to allocate")
    payer, total = preview.tenant_id, preview.total
    amounts: dict[str, Decimal] = {m: Decimal(0) for m in usage}
    basis = {m: strategy for m in usage}

    def add(part: Mapping[str, Decimal]) -> None:
        for k, v in part.items():
            amounts[k] = amounts.get(k, Decimal(0)) + v

    if strategy in ("direct", "showback"):
        for line in preview.lines:
            amount = Decimal(line["amount"])
            if line["item"] == "overage":
                resource = line["resource"]
                add(split_exactly(amount, {m: u.get(resource, Decimal(0)) for m, u in usage.items()}, payer))
            else:
                add({payer: amount})
    elif strategy in ("proportional_devices", "proportional_readings"):
        resource = ACTIVE_DEVICES if strategy == "proportional_devices" else READINGS
        add(split_exactly(total, {m: u.get(resource, Decimal(0)) for m, u in usage.items()}, payer))
    elif strategy == "fixed_percent":
        given = {k: (total * v / 100) for k, v in shares.items()}
        parts = split_exactly(total, {**given, payer: total - sum(given.values()) + given.get(payer, 0)}, payer)
        add(parts)
    else:  # fixed_amount
        if sum(shares.values()) > total:
            raise ChargebackError(f"fixed amounts add up to {sum(shares.values())}, more than the invoice ({total})")
        add({k: v.quantize(CENT) for k, v in shares.items()})
        add({payer: total - sum(v.quantize(CENT) for v in shares.values())})
    assert sum(amounts.values()) == total, (amounts, total)
    return [Allocation(m, amounts[m], basis[m]) for m in sorted(amounts)]


def set_policy(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, strategy: str, shares: Mapping[str, Any]
) -> dict[str, Decimal]:
    """Choose how the tenant's invoice is allocated (audited `billing.allocation.set`). Raises ChargebackError."""
    with actor.scope(conn):
        members = quota_members(conn, tenant_id)
    values = check_policy(strategy, shares, members)
    with actor.scope(conn, write=True):
        conn.execute(
            "INSERT INTO chargeback_policies (tenant_id, strategy, shares) VALUES (%s, %s, %s) "
            "ON CONFLICT (tenant_id) DO UPDATE SET strategy = excluded.strategy, shares = excluded.shares, "
            "updated_at = now()",
            (tenant_id, strategy, Jsonb({k: str(v) for k, v in values.items()})),
        )
        audit.record(conn, actor, tenant_id, "billing.allocation.set", "chargeback_policy", tenant_id,
                     {"strategy": strategy, "shares": {k: str(v) for k, v in values.items()}})  # fmt: skip
    return values


def get_policy(conn: psycopg.Connection, tenant_id: str) -> tuple[str, dict[str, Decimal]]:
    """The tenant's strategy and shares (`direct` without a policy); caller's scope."""
    row = conn.execute("SELECT strategy, shares FROM chargeback_policies WHERE tenant_id = %s", (tenant_id,)).fetchone()
    if row is None:
        return "direct", {}
    return row[0], {k: Decimal(v) for k, v in row[1].items()}


def allocation_report(conn: psycopg.Connection, tenant_id: str, month: date) -> AllocationReport:
    """The month's invoice preview of the tenant, allocated by its policy (caller's scope and transaction)."""
    preview = preview_month(conn, tenant_id, month)
    if preview.total is None and preview.lines and preview.lines[0]["item"] == "billed_to":
        raise ChargebackError(
            f"tenant {tenant_id!r} is billed with {preview.lines[0]['tenant_id']!r}: ask for its report"
        )
    strategy, shares = get_policy(conn, tenant_id)
    usage = member_usage(conn, quota_members(conn, tenant_id), month)
    allocations = allocate(preview, strategy, shares, usage)
    assert preview.total is not None
    return AllocationReport(
        tenant_id, month, strategy, strategy != "showback", preview.currency, preview.total, allocations
    )


def report_csv(report: AllocationReport) -> str:
    """The report as CSV: one row per member, then the total row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "payer", "tenant_id", "strategy", "billed", "currency", "amount"])
    for a in report.allocations:
        writer.writerow([f"{report.month:%Y-%m}", report.tenant_id, a.tenant_id, report.strategy,
                         str(report.billed).lower(), report.currency, f"{a.amount:.2f}"])  # fmt: skip
    writer.writerow([f"{report.month:%Y-%m}", report.tenant_id, "total", report.strategy, str(report.billed).lower(),
                     report.currency, f"{report.total:.2f}"])  # fmt: skip
    return out.getvalue()
