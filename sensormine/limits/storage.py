"""The storage quota of a plan: the quota group's bytes (hot store + lake, from the daily snapshots)
against the plan's `storage_gb`. The `usage_daily` asset checks it after it measured, raising the
80 % warning and the exceeded event once a month each (the notice mailer tells the administrators);
the writers refuse a group's new readings while it stores its plan's limit or more (`StorageGate`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

import psycopg

from sensormine.limits.devices import EVENT_TYPES, THRESHOLDS
from sensormine.metering.events import record_tenant_event
from sensormine.tenancy.plans import PlanError, get_plan
from sensormine.tenancy.tenants import UnknownTenant

log = logging.getLogger(__name__)

GB = 10**9


UPGRADE = "upgrade the plan (PUT /api/billing/subscription) or let retention or deletions shrink the data"


@dataclass(frozen=True)
class StoragePosition:
    """What a tenant's quota group stores against its plan (limit None: unlimited)."""

    tenant_id: str
    quota_tenant: str
    plan: str
    limit_bytes: int | None
    used_bytes: int
    measured_on: date | None  # the newest snapshot counted; None: nothing measured in the week

    @property
    def exceeded(self) -> bool:
        """The group stores its plan's limit or more: new readings are refused."""
        return self.limit_bytes is not None and self.used_bytes >= self.limit_bytes

    def refusal(self) -> str | None:
        """Why new data of the tenant is refused (naming the plan and the way out), or None."""
        if not self.exceeded:
            return None
        shared = ""
        if self.quota_tenant != self.tenant_id:
            shared = f" (shared with {self.quota_tenant!r}, whose plan applies)"
        return (
            f"storage quota exceeded: plan {self.plan} allows {(self.limit_bytes or 0) / GB:g} GB for tenant "
            f"{self.quota_tenant!r}{shared}, which stores {self.used_bytes / GB:.2f} GB (measured {self.measured_on}); "
            f"{UPGRADE}"
        )


def storage_position(conn: psycopg.Connection, tenant_id: str, day: date) -> StoragePosition | None:
    """The quota group's newest snapshots of the week up to `day` against its plan; None for an unknown
    tenant. Any role that may call sensormine_storage_quota_usage (ingest, metering, auth)."""
    row = conn.execute(
        "SELECT quota_tenant, plan, stored_bytes, measured_on FROM sensormine_storage_quota_usage(%s, %s)",
        (tenant_id, day),
    ).fetchone()
    if row is None:
        return None
    try:
        plan = get_plan(row[1] or "free")
    except PlanError:
        log.warning("tenant %s has an unknown plan %r; its storage is limited as free", row[0], row[1])
        plan = get_plan("free")
    limit = None if plan.storage_gb is None else int(plan.storage_gb * GB)
    return StoragePosition(tenant_id, row[0], plan.name, limit, int(row[2]), row[3])


class StorageGate:
    """Which tenants' new readings the writers refuse for storage beyond their plan.

    Each tenant's position is read at most once per `recheck_s` (an upgrade is honoured within that)
    through a connection of its own, opened by `connect` on first use and again after a failure. When
    the database cannot say, readings are admitted: the quota is enforced from the daily snapshots
    anyway, so a short outage of this check costs at most a few more bytes, never a reading.
    """

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        recheck_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], date] = lambda: datetime.now(UTC).date(),
    ) -> None:
        self._connect = connect
        self.recheck_s = recheck_s
        self._clock = clock
        self._today = today
        self._conn: psycopg.Connection | None = None
        self._verdicts: dict[str, tuple[float, str | None]] = {}  # tenant -> (read at, refusal)
        self._lock = threading.Lock()

    def refusal(self, tenant_id: str) -> str | None:
        """Why `tenant_id`'s new readings are refused now, or None to accept them."""
        now = self._clock()
        known = self._verdicts.get(tenant_id)
        if known is not None and now - known[0] < self.recheck_s:
            return known[1]
        with self._lock:
            verdict = self._read(tenant_id)
            self._verdicts[tenant_id] = (now, verdict)
        return verdict

    def _read(self, tenant_id: str) -> str | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            position = storage_position(self._conn, tenant_id, self._today())
            self._conn.commit()
        except psycopg.Error as exc:
            log.warning("storage quota of %s not checked (%s); admitting its readings", tenant_id, exc)
            self.close()
            return None
        return None if position is None else position.refusal()

    def close(self) -> None:
        """Release the connection (it is opened again on the next check)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


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
    position = storage_position(conn, tenant_id, day)
    if position is None:
        raise UnknownTenant(f"tenant {tenant_id!r} does not exist")
    quota_tenant, limit, used = position.quota_tenant, position.limit_bytes, position.used_bytes
    events: list[str] = []
    if limit is not None:
        for threshold in THRESHOLDS:
            if used * 100 >= limit * threshold:
                kind = f"quota.storage.{EVENT_TYPES[threshold]}"
                data = {"metric": "storage_bytes", "threshold_percent": threshold, "used": used, "limit": limit,
                        "plan": position.plan, "month": f"{day:%Y-%m}"}  # fmt: skip
                if record_tenant_event(
                    conn, quota_tenant, kind, data, f"quota.storage:{quota_tenant}:{day:%Y-%m}:{threshold}"
                ):
                    events.append(kind)
    return StorageQuota(quota_tenant, position.plan, limit, used, events)
