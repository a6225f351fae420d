"""What a tenant used in a month against its plan: the quota group's standing and the subtree's breakdown.

Metered so far: API calls (the API's counters, flushed) and ML inferences (scored rows of the
stream processor, the batch scoring asset and dry runs; `sensormine.anomaly.metering`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg

from sensormine.metering.calendar import next_month_start
from sensormine.metering.ledger import API_CALLS, ML_INFERENCE, usage_in_month
from sensormine.tenancy.tenants import visible_tenant_ids


@dataclass(frozen=True)
class Counts:
    """Metered counts of one tenant (or quota group) over a day or a month."""

    api_calls: int = 0
    ml_inference: int = 0


METRICS = {API_CALLS: "api_calls", ML_INFERENCE: "ml_inference"}  # usage.metric -> Counts field


@dataclass(frozen=True)
class MonthUsage:
    """A tenant's month of metered usage (flushed counts; the live counter may be ahead for the current month)."""

    tenant_id: str
    quota_tenant: str  # whose plan and quota apply
    plan: str
    group: Counts  # the quota group's counts in the month
    group_devices: int  # the quota group's registered devices
    by_day: list[tuple[date, Counts]]  # the tenant's own counts per day (days with any)
    by_tenant: list[tuple[str, Counts, int]]  # (tenant, counts, devices) for the tenant and each sub-tenant


def _by_key(rows: list[tuple[Any, str, int]]) -> dict[Any, Counts]:
    """(key, metric, value) rows -> the counts per key, in the rows' order."""
    grouped: dict[Any, dict[str, int]] = {}
    for key, metric, value in rows:
        grouped.setdefault(key, {})[METRICS[metric]] = int(value)
    return {k: Counts(**v) for k, v in grouped.items()}


def month_usage(conn: psycopg.Connection, tenant_id: str, first: datetime) -> MonthUsage:
    """Usage of the month starting at `first` (UTC), read in the caller's row-level-security scope."""
    start, end = first.date(), next_month_start(first).date()
    subtree = visible_tenant_ids(conn, tenant_id)
    row = conn.execute("SELECT * FROM sensormine_device_quota_usage(%s)", (tenant_id,)).fetchone()
    assert row is not None
    quota_tenant, plan_name, group_devices = row
    metrics = list(METRICS)
    per_tenant = _by_key(
        conn.execute(
            "SELECT tenant_id, metric, sum(value) FROM usage WHERE metric = ANY(%s) AND day >= %s AND day < %s "
            "AND tenant_id = ANY(%s) GROUP BY tenant_id, metric",
            (metrics, start, end, subtree),
        ).fetchall()
    )
    devices: dict[str, int] = dict(
        conn.execute(
            "SELECT tenant_id, count(*) FROM devices WHERE tenant_id = ANY(%s) GROUP BY tenant_id", (subtree,)
        ).fetchall()
    )
    per_day = _by_key(
        conn.execute(
            "SELECT day, metric, value FROM usage WHERE metric = ANY(%s) AND tenant_id = %s AND day >= %s "
            "AND day < %s ORDER BY day",
            (metrics, tenant_id, start, end),
        ).fetchall()
    )
    group = Counts(**{METRICS[m]: usage_in_month(conn, quota_tenant, m, first) for m in metrics})
    return MonthUsage(
        tenant_id=tenant_id,
        quota_tenant=quota_tenant,
        plan=plan_name,
        group=group,
        group_devices=int(group_devices),
        by_day=list(per_day.items()),
        by_tenant=[(t, per_tenant.get(t, Counts()), int(devices.get(t, 0))) for t in subtree],
    )
