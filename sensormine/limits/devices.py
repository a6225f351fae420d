"""The device quota of a plan, counted over the quota group in PostgreSQL; and the refusal every quota raises."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from sensormine.metering.calendar import month_label, utc_now
from sensormine.metering.events import record_tenant_event
from sensormine.tenancy.plans import get_plan
from sensormine.tenancy.tenants import UnknownTenant

WARNING_PERCENT = 80  # from this share of a quota on, answers carry a warning and an event is recorded


THRESHOLDS = (WARNING_PERCENT, 100)


EVENT_TYPES = {WARNING_PERCENT: "warning", 100: "exceeded"}  # quota.<metric>.<kind>


DEVICE_RETRY_AFTER_S = 3600  # nothing frees a device slot by itself: retry once the plan or the fleet changed


DEVICE_QUOTA_LOCK = 7_351_011  # advisory lock class serialising device creation per quota tenant


class QuotaExceeded(Exception):
    """A request beyond a plan's quota or rate: answer 429 with `Retry-After: retry_after_s`."""

    def __init__(self, detail: str, retry_after_s: int, **info: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.info = info  # kind (rate|api_calls|devices), plan, limit, used, …: machine-readable extras


@dataclass(frozen=True)
class DeviceQuota:
    """A quota group's device count after an accepted addition."""

    quota_tenant: str
    plan: str
    limit: int | None
    devices: int  # after the addition


def check_device_quota(
    conn: psycopg.Connection, tenant_id: str, adding: int = 1, *, now: datetime | None = None
) -> DeviceQuota:
    """Check that `adding` devices fit the plan of `tenant_id`'s quota group, or raise QuotaExceeded.

    Counts the devices of every tenant whose quota tenant is the same (a parent and its plan-less
    sub-tenants share one quota). Call it in the transaction that inserts the devices: it holds a
    lock per quota tenant until that transaction ends, so concurrent creations cannot overshoot.
    Reaching 80 % and 100 % records a `quota.devices.warning` / `quota.devices.exceeded` event (once
    a month), in the same transaction.
    """
    now = now or utc_now()
    row = conn.execute("SELECT quota_tenant FROM sensormine_device_quota_usage(%s)", (tenant_id,)).fetchone()
    if row is None or row[0] is None:
        raise UnknownTenant(f"tenant {tenant_id!r} does not exist")
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (DEVICE_QUOTA_LOCK, row[0]))
    row = conn.execute(
        "SELECT quota_tenant, plan, devices FROM sensormine_device_quota_usage(%s)", (tenant_id,)
    ).fetchone()
    assert row is not None
    quota_tenant, plan_name, devices = row[0], row[1], int(row[2])
    plan = get_plan(plan_name)
    limit = plan.max_devices
    after = devices + adding
    if limit is None:
        return DeviceQuota(quota_tenant, plan.name, None, after)
    if after > limit:
        shared = "" if quota_tenant == tenant_id else f" (shared with {quota_tenant!r}, whose plan applies)"
        raise QuotaExceeded(
            f"device quota reached: plan {plan.name} allows {limit} devices for tenant {quota_tenant!r}{shared}, "
            f"{devices} are registered and {adding} more would exceed it; upgrade the plan or delete devices",
            DEVICE_RETRY_AFTER_S,
            kind="devices",
            plan=plan.name,
            limit=limit,
            used=devices,
        )
    month = month_label(now)
    for threshold in THRESHOLDS:
        if after * 100 >= limit * threshold:
            record_tenant_event(
                conn,
                quota_tenant,
                f"quota.devices.{EVENT_TYPES[threshold]}",
                {"metric": "devices", "threshold_percent": threshold, "used": after, "limit": limit, "plan": plan.name},
                f"quota.devices:{quota_tenant}:{month}:{threshold}",
            )
    return DeviceQuota(quota_tenant, plan.name, limit, after)
