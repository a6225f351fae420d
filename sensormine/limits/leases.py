"""Call leases: one exact check takes a share of a busy tenant's tokens, later calls spend them locally."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sensormine.limits.quotas import CallAllowance, Quotas
from sensormine.tenancy.plans import Plan

log = logging.getLogger(__name__)


LEASE_TTL_S = 1.0  # leased tokens unused for this long are dropped (never returned: no over-admission)


LEASE_FLUSH_S = 0.5  # how often calls admitted from leases are counted in the shared monthly counter


def lease_size(plan: Plan) -> int:
    """Bucket tokens one API process takes per round trip: a twentieth of a second's worth of the plan's
    rate, at most a quarter of its burst; 1 (every call asks the backend, exactly) for slow plans."""
    if plan.rate_per_s is None or plan.burst is None:
        return 50
    return max(1, min(int(plan.rate_per_s // 20), plan.burst // 4))


@dataclass
class _Lease:
    tokens: int
    expires: float
    allowance: CallAllowance
    used: int | None


class CallLeases:
    """Admits most calls of a busy tenant without a round trip, from tokens leased out of the shared bucket.

    An exact check (`Quotas.check_call`) takes `lease_size(plan)` tokens at once; the next calls of the
    same quota tenant spend the rest locally within `LEASE_TTL_S`, and are counted in the monthly
    counter in batches every `LEASE_FLUSH_S`. The rate limit is never exceeded (tokens are taken
    before they are spent; unspent ones expire), and the monthly quota is checked against the known
    count plus this process's uncounted calls, so it can be overshot only by calls other processes
    admitted within one flush interval. Plans slower than 20 requests a second get leases of one
    token: every call is checked exactly, as without leases.
    """

    def __init__(self, quotas: Quotas, flush_s: float = LEASE_FLUSH_S, clock: Callable[[], float] = time.monotonic):
        self.quotas = quotas
        self.flush_s = flush_s
        self.clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._gates: dict[str, threading.Lock] = {}
        # calls admitted from leases, not counted yet: quota tenant -> tenant -> (plan, calls)
        self._pending: dict[str, dict[str, tuple[Plan, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="call-leases", daemon=True)

    def try_local(self, quota_tenant: str, tenant_id: str, plan: Plan) -> CallAllowance | None:
        """Admit a call from this process's lease, or None: ask `admit` (a round trip) instead."""
        with self._lock:
            lease = self._leases.get(quota_tenant)
            if lease is None or lease.tokens < 1 or self.clock() >= lease.expires:
                return None
            group = self._pending.setdefault(quota_tenant, {})
            pending = sum(n for _, n in group.values())
            used = None if lease.used is None else lease.used + pending + 1
            limit = plan.api_calls_per_month
            if limit is not None and (used is None or used > limit):
                return None  # near or past the limit: the exact path decides
            lease.tokens -= 1
            _, n = group.get(tenant_id, (plan, 0))
            group[tenant_id] = (plan, n + 1)
            a = lease.allowance
            remaining = None if a.rate_remaining is None else a.rate_remaining + lease.tokens
            return CallAllowance(a.plan, a.rate_limit, remaining, a.quota_limit, used, a.quota_reset_s, a.warning, 0)

    def admit(self, quota_tenant: str, tenant_id: str, plan: Plan) -> CallAllowance:
        """The exact check (blocking: backend round trips), taking a new lease; raises QuotaExceeded.

        One exact check per quota tenant at a time: concurrent callers wait for it and then spend
        its lease, instead of each taking a lease of their own.
        """
        with self._lock:
            gate = self._gates.setdefault(quota_tenant, threading.Lock())
        with gate:
            local = self.try_local(quota_tenant, tenant_id, plan)
            if local is not None:
                return local
            self._flush_tenant(quota_tenant)  # the exact count must include the calls served from leases
            allowance = self.quotas.check_call(quota_tenant, tenant_id, plan, tokens=lease_size(plan))
            with self._lock:
                self._leases[quota_tenant] = _Lease(
                    allowance.tokens - 1, self.clock() + LEASE_TTL_S, allowance, allowance.quota_used
                )
            return allowance

    def flush(self) -> None:
        """Count every call admitted from leases so far."""
        with self._lock:
            tenants = list(self._pending)
        for quota_tenant in tenants:
            self._flush_tenant(quota_tenant)

    def _flush_tenant(self, quota_tenant: str) -> None:
        with self._lock:
            taken = self._pending.pop(quota_tenant, {})
        for tenant_id, (plan, n) in taken.items():
            used = self.quotas.count_served(quota_tenant, tenant_id, plan, n)
            with self._lock:
                lease = self._leases.get(quota_tenant)
                if lease is not None and used is not None:
                    lease.used = max(lease.used or 0, used)

    def start(self) -> None:
        """Start counting leased calls in the background."""
        self._thread.start()

    def close(self) -> None:
        """Stop, after counting what is left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:
                log.exception("could not count calls admitted from leases; retrying")
