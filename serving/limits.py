"""Per-plan rate limits and quotas on the API (docs/quotas.md).

`start_limits(app, settings)` / `stop_limits(app)` run from the app's lifespan (after the connection
pool exists); the authentication dependency calls `enforce_call_limits` for every authenticated
request; the device routes call `device_quota_guard` before registering devices.

Headers on every limited answer:
- `X-RateLimit-Limit` (the bucket size, i.e. the burst), `X-RateLimit-Remaining` (tokens left);
- `X-Quota-Limit`, `X-Quota-Remaining`, `X-Quota-Reset` (seconds until the month resets, UTC) when the
  plan has a monthly API-call quota, and `X-Quota-Warning` from 80 % of it on.
A refusal is a 429 problem+json with `Retry-After` (seconds) and `kind` (rate, api_calls, devices).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import psycopg
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from sensormine.clients.postgres import METERING, role_scope
from sensormine.clients.redis import key_prefix, make_redis
from sensormine.limits.backends import MemoryBackend, QuotaBackend, RedisBackend
from sensormine.limits.devices import DeviceQuota, QuotaExceeded, check_device_quota
from sensormine.limits.leases import CallLeases
from sensormine.limits.quotas import Quotas
from sensormine.settings import Settings
from sensormine.tenancy.plans import PlanError, get_plan
from serving.problems import Problem

log = logging.getLogger(__name__)

PLATFORM_ADMIN = "platform_admin"


class LimitedCaller(Protocol):
    """What the limits need to know of an authenticated caller (serving.deps.Caller has it)."""

    @property
    def tenant_id(self) -> str | None: ...

    @property
    def role(self) -> str: ...

    @property
    def plan(self) -> str | None: ...

    @property
    def quota_tenant(self) -> str | None: ...


@contextmanager
def metering_connection(app: FastAPI) -> Iterator[psycopg.Connection]:
    """A pooled connection acting as the metering role for one transaction (usage, flushes, quota events)."""
    with app.state.pool.connection() as conn, role_scope(conn, METERING):
        yield conn


def make_quotas(app: FastAPI, settings: Settings) -> Quotas:
    """The limiter for `settings`: in Redis when configured, else in process memory (one process only)."""
    backend: QuotaBackend
    if settings.redis_url:
        backend = RedisBackend(make_redis(settings), key_prefix(settings))
    else:
        log.info("no SENSORMINE_REDIS_URL: rate limits and quotas are kept in this process only")
        backend = MemoryBackend()
    return Quotas(
        backend,
        lambda: metering_connection(app),
        flush_interval_s=settings.quota_flush_interval_s,
    )


def start_limits(app: FastAPI, settings: Settings) -> None:
    """Start rate limits, quotas and usage metering for `app` (call once `app.state.pool` exists)."""
    if not settings.limits_enabled:
        return
    quotas = make_quotas(app, settings)
    quotas.start()
    app.state.quotas = quotas
    app.state.call_leases = CallLeases(quotas)
    app.state.call_leases.start()
    app.state.enforce_call_limits = enforce_call_limits


def stop_limits(app: FastAPI) -> None:
    """Stop metering after writing the last usage counts (call before the pool closes)."""
    app.state.enforce_call_limits = None
    leases: CallLeases | None = getattr(app.state, "call_leases", None)
    if leases is not None:
        leases.close()  # count the calls admitted from leases before the last usage flush
        app.state.call_leases = None
    quotas: Quotas | None = getattr(app.state, "quotas", None)
    if quotas is not None:
        quotas.close()
        app.state.quotas = None


def too_many(exc: QuotaExceeded, headers: dict[str, str] | None = None) -> Problem:
    """The 429 problem for a refusal, with `Retry-After`."""
    return Problem(
        429,
        exc.detail,
        headers={**(headers or {}), "Retry-After": str(exc.retry_after_s)},
        retry_after_s=exc.retry_after_s,
        **exc.info,
    )


async def enforce_call_limits(request: Request, response: Response, caller: LimitedCaller) -> None:
    """Admit one authenticated request: token bucket, then the monthly API-call quota; 429 beyond them.

    Platform administrators are never limited. Sets the rate-limit and quota headers on `response`.
    """
    quotas: Quotas | None = getattr(request.app.state, "quotas", None)
    if quotas is None or caller.tenant_id is None or caller.role == PLATFORM_ADMIN:
        return
    quota_tenant = caller.quota_tenant or caller.tenant_id
    try:
        plan = get_plan(caller.plan or "free")
    except PlanError:
        log.warning("tenant %s has an unknown plan %r; limiting it as free", quota_tenant, caller.plan)
        plan = get_plan("free")
    try:
        leases: CallLeases = request.app.state.call_leases
        allowance = leases.try_local(quota_tenant, caller.tenant_id, plan)
        if allowance is None:  # no lease left: the exact check, a round trip to the backend
            allowance = await run_in_threadpool(leases.admit, quota_tenant, caller.tenant_id, plan)
    except QuotaExceeded as exc:
        headers = {}
        if exc.info.get("kind") == "rate" and plan.burst is not None:
            headers = {"X-RateLimit-Limit": str(plan.burst), "X-RateLimit-Remaining": "0"}
        raise too_many(exc, headers) from None
    # Appended to the raw list: setting them one by one rescans the headers each time (a hot path).
    raw = response.raw_headers
    if allowance.rate_limit is not None and allowance.rate_remaining is not None:
        raw.append((b"x-ratelimit-limit", str(allowance.rate_limit).encode()))
        raw.append((b"x-ratelimit-remaining", str(allowance.rate_remaining).encode()))
    if allowance.quota_limit is not None and allowance.quota_used is not None:
        raw.append((b"x-quota-limit", str(allowance.quota_limit).encode()))
        raw.append((b"x-quota-remaining", str(max(0, allowance.quota_limit - allowance.quota_used)).encode()))
        raw.append((b"x-quota-reset", str(allowance.quota_reset_s).encode()))
    if allowance.warning:
        raw.append((b"x-quota-warning", allowance.warning.encode("latin-1", "replace")))


def ingest_rate_guard(app: FastAPI, quota_tenant: str, plan_name: str | None) -> None:
    """The per-plan rate of HTTP ingest requests (blocking: run it in the thread pool); a 429 beyond it."""
    quotas: Quotas | None = getattr(app.state, "quotas", None)
    if quotas is None:
        return
    try:
        plan = get_plan(plan_name or "free")
    except PlanError:
        plan = get_plan("free")
    try:
        quotas.check_ingest(quota_tenant, plan)
    except QuotaExceeded as exc:
        raise too_many(exc, {"X-RateLimit-Limit": str(plan.burst), "X-RateLimit-Remaining": "0"}) from None


def device_quota_guard(conn: psycopg.Connection, tenant_id: str, adding: int = 1) -> DeviceQuota:
    """`check_device_quota` for a route: a refusal becomes a 429 problem with `Retry-After`.

    Call it inside the transaction that inserts the devices (it holds the quota group's lock until then).
    """
    try:
        return check_device_quota(conn, tenant_id, adding)
    except QuotaExceeded as exc:
        raise too_many(exc) from None
