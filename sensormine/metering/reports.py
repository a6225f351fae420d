"""What a tenant used in a month against its plan: the quota group's standing and the subtree's breakdown."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from sensormine.metering.calendar import next_month_start
from sensormine.metering.ledger import API_CALLS, usage_in_month
from sensormine.tenancy.tenants import visible_tenant_ids


@dataclass(frozen=True)
class MonthUsage:
    """A tenant's month of metered usage (flushed counts; the live counter may be ahead for the current month)."""

    tenant_id: str
    quota_tenant: str  # whose plan and quota apply
    plan: str
    group_api_calls: int  # the quota group's calls in the month
    group_devices: int  # the quota group's registered devices
    by_day: list[tuple[date, int]]  # the tenant's own calls per day
    by_tenant: list[tuple[str, int, int]]  # (tenant, calls, devices) for the tenant and each sub-tenant


def month_usage(conn: psycopg.Connection, tenant_id: str, first: datetime) -> MonthUsage:
    """Usage of the month starting at `first` (UTC), read in the caller's row-level-security scope."""
    start, end = first.date(), next_month_start(first).date()
    subtree = visible_tenant_ids(conn, tenant_id)
    row = conn.execute("SELECT * FROM sensormine_device_quota_usage(%s)", (tenant_id,)).fetchone()
    assert row is not None
    quota_tenant, plan_name, group_devices = row
    calls: dict[str, int] = dict(
        conn.execute(
            "SELECT tenant_id, sum(value) FROM usage WHERE metric = %s AND day >= %s AND day < %s "
            "AND tenant_id = ANY(%s) GROUP BY tenant_id",
            (API_CALLS, start, end, subtree),
        ).fetchall()
    )
    devices: dict[str, int] = dict(
        conn.execute(
            "SELECT tenant_id, count(*) FROM devices WHERE tenant_id = ANY(%s) GROUP BY tenant_id", (subtree,)
        ).fetchall()
    )
    days = conn.execute(
        "SELECT day, value FROM usage WHERE metric = %s AND tenant_id = %s AND day >= %s AND day < %s ORDER BY day",
        (API_CALLS, tenant_id, start, end),
    ).fetchall()
    return MonthUsage(
        tenant_id=tenant_id,
        quota_tenant=quota_tenant,
        plan=plan_name,
        group_api_calls=usage_in_month(conn, quota_tenant, API_CALLS, first),
        group_devices=int(group_devices),
        by_day=[(d, int(v)) for d, v in days],
        by_tenant=[(t, int(calls.get(t, 0)), int(devices.get(t, 0))) for t in subtree],
    )
