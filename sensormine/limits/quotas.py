"""Quotas and rate limits per plan (docs/quotas.md).

- A token bucket per quota tenant (the tenant whose plan applies; sub-tenants without a plan share
  their parent's): one atomic Redis script refills by the time elapsed (Redis's clock), takes a token,
  and answers allowed, remaining tokens and the wait until the next token.
- A monthly API-call counter per quota tenant, limited by the plan: a call beyond it is refused
  until the start of the next month (UTC); from 80 % on each answer carries a warning, and each
  threshold (80 %, 100 %) is recorded once per tenant and month as a `tenant_events` row.
- The device quota, counted over the quota group in PostgreSQL (`check_device_quota`).
- Usage metering: every counted call is also added to a per-tenant, per-day "unflushed" counter;
  `UsageFlusher` moves those counters into the `usage` table. A move is one atomic script that
  takes the counters into a *pending batch* with a fresh flush id; the batch is added to `usage`
  in one transaction that also records the flush id (a batch seen before adds nothing), and only
  then is the pending batch deleted. A process dying anywhere in between leaves the batch pending,
  and the next flush (of any process, at start-up at the latest) completes it: counts are neither
  lost nor counted twice.

Without Redis (`SENSORMINE_REDIS_URL` unset, e.g. `make demo`) `MemoryBackend` does the same in
process memory: correct for a single API process only, and what was not yet flushed is lost if the
process dies (a clean stop flushes).

If Redis loses its data (the launcher's Redis keeps none across restarts), the month's count of a
quota tenant is re-seeded from the `usage` table on its next call: the quota then forgets at most the
calls not yet flushed (a few seconds' worth).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from sensormine.limits.backends import REDIS_ERROR_LOG_EVERY_S, BucketResult, CountResult, QuotaBackend
from sensormine.limits.devices import EVENT_TYPES, THRESHOLDS, WARNING_PERCENT, QuotaExceeded
from sensormine.metering.calendar import Clock, month_label, next_month_start, seconds_until_next_month, utc_now
from sensormine.metering.events import record_tenant_event
from sensormine.metering.ledger import (
    API_CALLS,
    DEFAULT_FLUSH_INTERVAL_S,
    ConnectionFactory,
    UsageFlusher,
    counter_member,
    usage_in_month,
)
from sensormine.tenancy.plans import Plan

log = logging.getLogger(__name__)


MONTH_KEY_GRACE_S = 7 * 86_400  # a month's counter outlives the month by this much


@dataclass(frozen=True)
class CallAllowance:
    """What an accepted call leaves: the rate bucket, the monthly quota, and any warning to show."""

    plan: str
    rate_limit: int | None  # the bucket size (burst); None: not rate limited
    rate_remaining: int | None
    quota_limit: int | None  # the monthly API calls; None: unlimited
    quota_used: int | None
    quota_reset_s: int  # seconds until the monthly quota resets
    warning: str | None
    tokens: int = 1  # bucket tokens taken for this call and (leased) later ones


def _fmt(n: int) -> str:
    return f"{n:,}".replace(",", " ")


class Quotas:
    """Rate limits and the monthly API-call quota for API calls, with usage metering."""

    def __init__(
        self,
        backend: QuotaBackend,
        connect: ConnectionFactory,
        *,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        clock: Clock = utc_now,
    ) -> None:
        self.backend = backend
        self.connect = connect
        self.clock = clock
        self.flusher = UsageFlusher(backend, connect, flush_interval_s)
        self._last_error_log = -math.inf
        self._emitted: set[str] = set()  # events this process knows are recorded: no Redis round trip for them

    def start(self) -> None:
        """Start the usage flusher (completing batches an earlier process left pending)."""
        self.flusher.start()

    def close(self) -> None:
        """Stop the usage flusher after a last flush."""
        self.flusher.close()

    def check_call(self, quota_tenant: str, tenant_id: str, plan: Plan, tokens: int = 1) -> CallAllowance:
        """Admit one API call of `tenant_id` (counted against `quota_tenant`'s `plan`), or raise QuotaExceeded.

        The token bucket first (a refused call is not counted), then the monthly quota (a call beyond it
        is neither counted nor metered). If the backend fails (Redis down) the call is admitted, unmetered:
        an outage of the limiter does not become an outage of the API.
        """
        now = self.clock()
        reset_s = seconds_until_next_month(now)
        try:
            bucket = self._take_token(quota_tenant, plan, tokens)
            count = self._count(quota_tenant, tenant_id, plan, now)
        except redis.RedisError as exc:
            self._log_backend_error(exc)
            return CallAllowance(plan.name, plan.burst, None, plan.api_calls_per_month, None, reset_s, None)
        warning = None
        limit = plan.api_calls_per_month
        if limit is not None:
            self._maybe_events(quota_tenant, API_CALLS, plan, count.used, limit, now)
            if not count.allowed:
                raise QuotaExceeded(
                    f"tenant {quota_tenant!r} has used its {_fmt(limit)} API calls for {month_label(now)} "
                    f"(plan {plan.name}); calls resume on {next_month_start(now):%Y-%m-%d} 00:00 UTC, "
                    "or upgrade the plan",
                    reset_s,
                    kind=API_CALLS,
                    plan=plan.name,
                    limit=limit,
                    used=count.used,
                )
            if count.used * 100 >= limit * WARNING_PERCENT:
                warning = (
                    f"{count.used * 100 // limit}% of the monthly API-call quota used "
                    f"({count.used} of {limit}, plan {plan.name}); it resets {next_month_start(now):%Y-%m-%d}"
                )
        return CallAllowance(
            plan.name,
            plan.burst,
            bucket.remaining if bucket else None,
            limit,
            count.used,
            reset_s,
            warning,
            bucket.granted if bucket else tokens,
        )

    def check_ingest(self, quota_tenant: str, plan: Plan) -> None:
        """Admit one HTTP ingest request of a quota group, or raise QuotaExceeded (kind `ingest_rate`).

        Its own token bucket at the plan's rate, apart from API calls: devices pushing data never use up
        the tenant's API rate, and ingest is metered by volume, not counted as API calls. A backend
        failure admits the request, like any call while Redis is down.
        """
        if plan.rate_per_s is None or plan.burst is None:
            return
        try:
            result = self.backend.take_token(f"ingest:{quota_tenant}", plan.rate_per_s, plan.burst)
        except redis.RedisError as exc:
            self._log_backend_error(exc)
            return
        if not result.allowed:
            retry_s = max(1, math.ceil(result.retry_after_ms / 1000))
            raise QuotaExceeded(
                f"too many ingest requests for tenant {quota_tenant!r}: plan {plan.name} allows "
                f"{plan.rate_per_s:g} a second (bursts of {plan.burst}); send larger batches less often, "
                f"or retry after {retry_s} s",
                retry_s,
                kind="ingest_rate",
                plan=plan.name,
                limit=plan.burst,
                retry_after_ms=result.retry_after_ms,
            )

    def _take_token(self, quota_tenant: str, plan: Plan, n: int = 1) -> BucketResult | None:
        if plan.rate_per_s is None or plan.burst is None:
            return None
        result = self.backend.take_token(quota_tenant, plan.rate_per_s, plan.burst, n)
        if not result.allowed:
            retry_s = max(1, math.ceil(result.retry_after_ms / 1000))
            raise QuotaExceeded(
                f"too many requests for tenant {quota_tenant!r}: plan {plan.name} allows {plan.rate_per_s:g} "
                f"requests a second (bursts of {plan.burst}); retry after {retry_s} s",
                retry_s,
                kind="rate",
                plan=plan.name,
                limit=plan.burst,
                retry_after_ms=result.retry_after_ms,
            )
        return result

    def _count(
        self, quota_tenant: str, tenant_id: str, plan: Plan, now: datetime, n: int = 1, force: bool = False
    ) -> CountResult:
        month = month_label(now)
        member = counter_member(API_CALLS, tenant_id, f"{now.astimezone(UTC):%Y-%m-%d}")
        ttl_s = seconds_until_next_month(now) + MONTH_KEY_GRACE_S
        limit = plan.api_calls_per_month
        result = self.backend.count_call(quota_tenant, month, member, limit, None, ttl_s, n, force)
        if result is None:  # first call of the month here, or Redis lost its data: start from the usage table
            with self.connect() as conn:
                seed = usage_in_month(conn, quota_tenant, API_CALLS, now)
            result = self.backend.count_call(quota_tenant, month, member, limit, seed, ttl_s, n, force)
            assert result is not None
        return result

    def count_served(self, quota_tenant: str, tenant_id: str, plan: Plan, n: int) -> int | None:
        """Count `n` calls already admitted from a lease (even beyond the limit); the month's count, or None
        when the backend failed."""
        now = self.clock()
        try:
            used = self._count(quota_tenant, tenant_id, plan, now, n, force=True).used
            if plan.api_calls_per_month is not None:
                self._maybe_events(quota_tenant, API_CALLS, plan, used, plan.api_calls_per_month, now)
        except redis.RedisError as exc:
            self._log_backend_error(exc)
            return None
        return used

    def _maybe_events(self, quota_tenant: str, metric: str, plan: Plan, used: int, limit: int, now: datetime) -> None:
        if len(self._emitted) > 100_000:  # older months' names pile up in a long-lived process
            self._emitted.clear()
        for threshold in THRESHOLDS:
            if used * 100 < limit * threshold:
                continue
            month = month_label(now)
            name = f"{metric}:{quota_tenant}:{month}:{threshold}"
            if name in self._emitted:
                continue
            if not self.backend.mark_once(name, seconds_until_next_month(now) + MONTH_KEY_GRACE_S):
                self._emitted.add(name)
                continue
            try:
                with self.connect() as conn, conn.transaction():
                    record_tenant_event(
                        conn,
                        quota_tenant,
                        f"quota.{metric}.{EVENT_TYPES[threshold]}",
                        {
                            "metric": metric,
                            "threshold_percent": threshold,
                            "used": used,
                            "limit": limit,
                            "plan": plan.name,
                            "month": month,
                        },
                        f"quota.{metric}:{quota_tenant}:{month}:{threshold}",
                    )
                self._emitted.add(name)
            except Exception:
                self.backend.unmark(name)  # the next call tries again
                log.exception("could not record the %s%% %s event of tenant %s", threshold, metric, quota_tenant)

    def _log_backend_error(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= REDIS_ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning("rate limits and quotas are not enforced: Redis failed (%s)", exc)
