"""The storage quota of a plan: the quota group's bytes (hot store + lake, from the daily snapshots)
against the plan's `storage_gb`, raising the 80 % warning and the exceeded event once a month each
(the notice mailer tells the administrators). Checked by the `usage_daily` asset after it measured."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import psycopg

from sensormine.limits.devices import EVENT_TYPES, THRESHOLDS
from sensormine.metering.events import record_tenant_event
from sensormine.tenancy.plans import get_plan

GB = 10**9


@dataclass(frozen=True)
class StorageQuota:
    """The quota group's stored bytes against its plan (limit None: unlimited); the events recorded now."""

    quota_tenant: str
    plan: str
    limit_bytes: int | None
    used_bytes: int
    events: list[str]


def check_storage_quota(conn: psycopg.Connection, tenant_id: str, day: date) -> StorageQuota:
    """Compare the quota group's newest snapshots up to `day` with its plan (metering role, caller's
    transaction); record a warning at 80 % and an exceeded event at 100 %, once per month each."""
    row = conn.execute(
        "SELECT q.qt, sensormine_effective_plan(q.qt), coalesce((SELECT sum(s.hot_bytes + s.lake_bytes) FROM "
        "(SELECT DISTINCT ON (tenant_id) hot_bytes, lake_bytes FROM tenant_usage_snapshots "
        "WHERE tenant_id IN (SELECT sensormine_quota_group(q.qt)) AND day <= %s AND day > %s::date - 7 "
        "ORDER BY tenant_id, day DESC) s), 0) FROM (SELECT sensormine_quota_tenant(%s) AS qt) q",
        (day, day, tenant_id),
    ).fetchone()
    assert row is not None
    quota_tenant, plan_name, used = row[0], row[1] or "free", int(row[2])
    plan = get_plan(plan_name)
    limit = None if plan.storage_gb is None else int(plan.storage_gb * GB)
    events: list[str] = []
    if limit is not None:
        for threshold in THRESHOLDS:
            if used * 100 >= limit * threshold:
                kind = f"quota.storage.{EVENT_TYPES[threshold]}"
                data = {"metric": "storage_bytes", "threshold_percent": threshold, "used": used, "limit": limit,
                        "plan": plan.name, "month": f"{day:%Y-%m}"}  # fmt: skip
                if record_tenant_event(
                    conn, quota_tenant, kind, data, f"quota.storage:{quota_tenant}:{day:%Y-%m}:{threshold}"
                ):
                    events.append(kind)
    return StorageQuota(quota_tenant, plan.name, limit, used, events)
