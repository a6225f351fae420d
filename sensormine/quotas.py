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

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import psycopg
import redis

from sensormine.plans import Plan, get_plan

log = logging.getLogger(__name__)

API_CALLS = "api_calls"
WARNING_PERCENT = 80  # from this share of a quota on, answers carry a warning and an event is recorded
THRESHOLDS = (WARNING_PERCENT, 100)
EVENT_TYPES = {WARNING_PERCENT: "warning", 100: "exceeded"}  # quota.<metric>.<kind>
DEVICE_RETRY_AFTER_S = 3600  # nothing frees a device slot by itself: retry once the plan or the fleet changed
DEFAULT_FLUSH_INTERVAL_S = 5.0
FLUSH_BATCH_MEMBERS = 500  # (metric, tenant, day) counters moved per pending batch
LEDGER_KEEP = timedelta(days=7)  # a pending batch re-flushed later than this could be counted twice
LEDGER_PRUNE_EVERY_S = 3600.0
MONTH_KEY_GRACE_S = 7 * 86_400  # a month's counter outlives the month by this much
DEVICE_QUOTA_LOCK = 7_351_011  # advisory lock class serialising device creation per quota tenant
REDIS_ERROR_LOG_EVERY_S = 60.0
TOKEN_EPSILON = 1e-6  # the bucket script keeps tokens to six decimals

Clock = Callable[[], datetime]
ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]


def utc_now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def month_start(now: datetime) -> datetime:
    """Midnight UTC on the first of `now`'s month."""
    now = now.astimezone(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def next_month_start(now: datetime) -> datetime:
    """Midnight UTC on the first of the month after `now`'s."""
    start = month_start(now)
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def seconds_until_next_month(now: datetime) -> int:
    """Whole seconds (rounded up, at least 1) until the next month starts, UTC."""
    return max(1, math.ceil((next_month_start(now) - now).total_seconds()))


def month_label(now: datetime) -> str:
    """`YYYY-MM` of `now`, UTC."""
    return f"{now.astimezone(UTC):%Y-%m}"


class QuotaExceeded(Exception):
    """A request beyond a plan's quota or rate: answer 429 with `Retry-After: retry_after_s`."""

    def __init__(self, detail: str, retry_after_s: int, **info: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.info = info  # kind (rate|api_calls|devices), plan, limit, used, …: machine-readable extras


@dataclass(frozen=True)
class BucketResult:
    """One take from a token bucket."""

    allowed: bool
    remaining: int  # whole tokens left after this take
    retry_after_ms: int  # 0 when allowed; else the wait until a token is available
    granted: int = 1  # tokens taken (up to the number asked for; 0 when refused)


@dataclass(frozen=True)
class CountResult:
    """One API call offered to the monthly counter."""

    allowed: bool
    used: int  # the month's count after this call (unchanged when refused)


@dataclass(frozen=True)
class FlushBatch:
    """Counters moved out of the live counters under one flush id: (metric, tenant_id, day) -> count."""

    flush_id: str
    counts: dict[tuple[str, str, str], int]


def _member(metric: str, tenant_id: str, day: str) -> str:
    return f"{metric}|{tenant_id}|{day}"


def _parse_counts(payload: str) -> dict[tuple[str, str, str], int]:
    counts: dict[tuple[str, str, str], int] = {}
    for member, n in json.loads(payload).items():
        metric, tenant_id, day = member.split("|")
        counts[(metric, tenant_id, day)] = int(n)
    return counts


class QuotaBackend(Protocol):
    """Where buckets and counters live: Redis (shared by every API process) or process memory."""

    def take_token(self, bucket: str, rate_per_s: float, burst: int, n: int = 1) -> BucketResult:
        """Refill `bucket` by the time elapsed, then take up to `n` tokens (at least one, or none)."""
        ...

    def count_call(
        self,
        quota_tenant: str,
        month: str,
        member: str,
        limit: int | None,
        seed: int | None,
        ttl_s: int,
        n: int = 1,
        force: bool = False,
    ) -> CountResult | None:
        """Count `n` calls against the month's quota and in the unflushed counter `member`.

        None when the month's counter does not exist and no `seed` was given (the caller seeds it
        from the usage table and asks again); refused, without counting, when `limit` is reached,
        unless `force` (calls already served, counted after the fact).
        """
        ...

    def month_count(self, quota_tenant: str, month: str) -> int | None:
        """The month's count of a quota tenant, None when it has none."""
        ...

    def mark_once(self, name: str, ttl_s: int) -> bool:
        """Set a marker; true only for the first caller while it lives."""
        ...

    def unmark(self, name: str) -> None:
        """Remove a marker (its action failed; let the next caller try again)."""
        ...

    def take_batch(self, max_members: int) -> FlushBatch | None:
        """Atomically move unflushed counters into a new pending batch; None when there are none."""
        ...

    def pending_batches(self) -> list[FlushBatch]:
        """Batches taken but not yet acknowledged (some process may have died while flushing them)."""
        ...

    def ack(self, flush_id: str) -> None:
        """Forget a pending batch once the database holds it."""
        ...


# --- Redis ------------------------------------------------------------------------------------

# Token bucket. KEYS[1] the bucket hash; ARGV rate per second, burst. Time is Redis's own (TIME),
# so every API process refills by the same clock. ARGV[3] how many tokens are wanted: at least one,
# at most that many are taken. Returns {tokens taken (0: refused), whole tokens left, retry ms}.
_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3]) or 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate / 1000000)
local allowed = 0
local retry_ms = 0
if tokens >= 0.999999 then
  allowed = math.max(1, math.min(want, math.floor(tokens + 0.000001)))
  tokens = math.max(0, tokens - allowed)
else
  retry_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, math.floor(tokens), retry_ms}
"""

# Monthly count. KEYS[1] the month counter, KEYS[2] the unflushed counter, KEYS[3] the dirty set.
# ARGV limit (-1: none), seed ('' : none), dirty member, month counter TTL (s), calls to count, force
# ('1': count even beyond the limit: calls already served).
# Returns {-1, 0} (needs a seed), {0, used} (refused, not counted) or {1, used}.
_COUNT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '' then return {-1, 0} end
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[4])
end
local used = tonumber(redis.call('GET', KEYS[1]))
local limit = tonumber(ARGV[1])
local n = tonumber(ARGV[5]) or 1
if ARGV[6] ~= '1' and limit >= 0 and used >= limit then return {0, used} end
used = redis.call('INCRBY', KEYS[1], n)
redis.call('INCRBY', KEYS[2], n)
redis.call('SADD', KEYS[3], ARGV[3])
return {1, used}
"""

# Move to a pending batch. KEYS[1] the dirty set, KEYS[2] the pending hash; ARGV flush id, how many
# members, the unflushed counters' key prefix. Returns the batch as JSON {member: "count"}, or nil.
_TAKE_BATCH_LUA = """
local members = redis.call('SPOP', KEYS[1], ARGV[2])
local batch = {}
local n = 0
for _, m in ipairs(members) do
  local v = redis.call('GETDEL', ARGV[3] .. m)
  if v then
    batch[m] = v
    n = n + 1
  end
end
if n == 0 then return nil end
local payload = cjson.encode(batch)
redis.call('HSET', KEYS[2], ARGV[1], payload)
return payload
"""


class RedisBackend:
    """Buckets and counters in Redis, shared by every API process (single Redis node; see docs/quotas.md)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._bucket = client.register_script(_BUCKET_LUA)
        self._count = client.register_script(_COUNT_LUA)
        self._take = client.register_script(_TAKE_BATCH_LUA)
        self._dirty = prefix + "usage:dirty"
        self._pending = prefix + "usage:pending"
        self._unflushed = prefix + "usage:unflushed:"

    def month_key(self, quota_tenant: str, month: str) -> str:
        """Key of a quota tenant's monthly API-call counter."""
        return f"{self.prefix}quota:{API_CALLS}:{quota_tenant}:{month}"

    def take_token(self, bucket: str, rate_per_s: float, burst: int, n: int = 1) -> BucketResult:
        granted, remaining, retry_ms = self._bucket(keys=[f"{self.prefix}bucket:{bucket}"], args=[rate_per_s, burst, n])
        return BucketResult(bool(granted), int(remaining), int(retry_ms), int(granted))

    def count_call(
        self,
        quota_tenant: str,
        month: str,
        member: str,
        limit: int | None,
        seed: int | None,
        ttl_s: int,
        n: int = 1,
        force: bool = False,
    ) -> CountResult | None:
        status, used = self._count(
            keys=[self.month_key(quota_tenant, month), self._unflushed + member, self._dirty],
            args=[-1 if limit is None else limit, "" if seed is None else seed, member, ttl_s, n, int(force)],
        )
        return None if int(status) < 0 else CountResult(bool(status), int(used))

    def month_count(self, quota_tenant: str, month: str) -> int | None:
        value = self.client.get(self.month_key(quota_tenant, month))
        return None if value is None else int(str(value))

    def mark_once(self, name: str, ttl_s: int) -> bool:
        return bool(self.client.set(f"{self.prefix}once:{name}", "1", nx=True, ex=ttl_s))

    def unmark(self, name: str) -> None:
        self.client.delete(f"{self.prefix}once:{name}")

    def take_batch(self, max_members: int) -> FlushBatch | None:
        flush_id = uuid.uuid4().hex
        payload = self._take(keys=[self._dirty, self._pending], args=[flush_id, max_members, self._unflushed])
        return None if payload is None else FlushBatch(flush_id, _parse_counts(str(payload)))

    def pending_batches(self) -> list[FlushBatch]:
        pending: dict[str, str] = self.client.hgetall(self._pending)  # type: ignore[assignment]
        return [FlushBatch(fid, _parse_counts(payload)) for fid, payload in sorted(pending.items())]

    def ack(self, flush_id: str) -> None:
        self.client.hdel(self._pending, flush_id)


# --- in process -------------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class MemoryBackend:
    """The same in process memory, for a single API process without Redis (the embedded default)."""

    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _months: dict[tuple[str, str], int] = field(default_factory=dict)
    _unflushed: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, str] = field(default_factory=dict)
    _marks: dict[str, float] = field(default_factory=dict)

    def take_token(self, bucket: str, rate_per_s: float, burst: int, n: int = 1) -> BucketResult:
        with self._lock:
            now = self.clock()
            b = self._buckets.get(bucket)
            if b is None:
                b = self._buckets[bucket] = _Bucket(float(burst), now)
            b.tokens = min(float(burst), b.tokens + max(0.0, now - b.at) * rate_per_s)
            b.at = now
            if b.tokens >= 1 - TOKEN_EPSILON:  # time arithmetic in floats: 0.9999999 tokens is one token
                granted = max(1, min(n, math.floor(b.tokens + TOKEN_EPSILON)))
                b.tokens = max(0.0, b.tokens - granted)
                return BucketResult(True, math.floor(b.tokens), 0, granted)
            return BucketResult(False, math.floor(b.tokens), math.ceil((1 - b.tokens) * 1000 / rate_per_s), 0)

    def count_call(
        self,
        quota_tenant: str,
        month: str,
        member: str,
        limit: int | None,
        seed: int | None,
        ttl_s: int,
        n: int = 1,
        force: bool = False,
    ) -> CountResult | None:
        with self._lock:
            used = self._months.get((quota_tenant, month))
            if used is None:
                if seed is None:
                    return None
                used = seed
            if not force and limit is not None and used >= limit:
                self._months[(quota_tenant, month)] = used
                return CountResult(False, used)
            used += n
            self._months[(quota_tenant, month)] = used
            self._unflushed[member] = self._unflushed.get(member, 0) + n
            return CountResult(True, used)

    def month_count(self, quota_tenant: str, month: str) -> int | None:
        with self._lock:
            return self._months.get((quota_tenant, month))

    def mark_once(self, name: str, ttl_s: int) -> bool:
        with self._lock:
            now = self.clock()
            if self._marks.get(name, -math.inf) > now:
                return False
            self._marks[name] = now + ttl_s
            return True

    def unmark(self, name: str) -> None:
        with self._lock:
            self._marks.pop(name, None)

    def take_batch(self, max_members: int) -> FlushBatch | None:
        with self._lock:
            members = list(self._unflushed)[:max_members]
            if not members:
                return None
            batch = {m: str(self._unflushed.pop(m)) for m in members}
            flush_id = uuid.uuid4().hex
            payload = json.dumps(batch)
            self._pending[flush_id] = payload
        return FlushBatch(flush_id, _parse_counts(payload))

    def pending_batches(self) -> list[FlushBatch]:
        with self._lock:
            return [FlushBatch(fid, _parse_counts(p)) for fid, p in sorted(self._pending.items())]

    def ack(self, flush_id: str) -> None:
        with self._lock:
            self._pending.pop(flush_id, None)


# --- the database side ------------------------------------------------------------------------


def record_tenant_event(
    conn: psycopg.Connection, tenant_id: str, event_type: str, data: dict[str, Any], dedupe_key: str | None = None
) -> bool:
    """Record a tenant event (in the caller's transaction); with `dedupe_key`, only once. True if recorded."""
    row = conn.execute(
        "SELECT sensormine_record_tenant_event(%s, %s, %s::jsonb, %s)",
        (tenant_id, event_type, json.dumps(data), dedupe_key),
    ).fetchone()
    return bool(row and row[0])


def usage_in_month(conn: psycopg.Connection, quota_tenant: str, metric: str, now: datetime) -> int:
    """What the `usage` table holds for a quota group (the tenant and its plan-less sub-tenants) this month."""
    row = conn.execute(
        "SELECT coalesce(sum(value), 0) FROM usage WHERE metric = %s AND day >= %s AND day < %s "
        "AND tenant_id IN (SELECT sensormine_quota_group(%s))",
        (metric, month_start(now).date(), next_month_start(now).date(), quota_tenant),
    ).fetchone()
    return int(row[0]) if row else 0


def write_batch(conn: psycopg.Connection, batch: FlushBatch) -> bool:
    """Add a batch to `usage` in one transaction, unless its flush id is already there; true if added."""
    rows = sorted(batch.counts.items())  # one lock order for every writer: no deadlocks between flushers
    with conn.transaction():
        new = conn.execute(
            "INSERT INTO usage_flushes (flush_id, rows, total) VALUES (%s, %s, %s) "
            "ON CONFLICT (flush_id) DO NOTHING RETURNING flush_id",
            (batch.flush_id, len(rows), sum(n for _, n in rows)),
        ).fetchone()
        if new is None:
            return False
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO usage (tenant_id, metric, day, value) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, metric, day) DO UPDATE "
                "SET value = usage.value + excluded.value, updated_at = now()",
                [(tenant_id, metric, date.fromisoformat(day), n) for (metric, tenant_id, day), n in rows],
            )
    return True


class UsageFlusher:
    """Moves unflushed counters to the `usage` table every `interval_s`; completes pending batches first.

    `start()` flushes what an earlier process left pending, then keeps flushing in a daemon thread;
    `close()` stops the thread and flushes once more.
    """

    def __init__(self, backend: QuotaBackend, connect: ConnectionFactory, interval_s: float = DEFAULT_FLUSH_INTERVAL_S):
        self.backend = backend
        self.connect = connect
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_prune = -math.inf

    def start(self) -> None:
        """Flush what is pending, then flush every `interval_s` in the background."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop flushing in the background, after one last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("the last usage flush failed; the counts stay in Redis for the next process")

    def _run(self) -> None:
        while True:
            try:
                self.flush()
            except Exception:
                log.exception("usage flush failed; retrying in %.1f s", self.interval_s)
            if self._stop.wait(self.interval_s):
                return

    def flush(self) -> int:
        """Complete pending batches, then move and write the live counters; returns the calls written."""
        with self._lock:
            written = 0
            for pending in self.backend.pending_batches():
                written += self._apply(pending)
            while (batch := self.backend.take_batch(FLUSH_BATCH_MEMBERS)) is not None:
                written += self._apply(batch)
            if time.monotonic() - self._last_prune >= LEDGER_PRUNE_EVERY_S:
                self._prune()
            return written

    def _apply(self, batch: FlushBatch) -> int:
        with self.connect() as conn:
            added = write_batch(conn, batch)
        self.backend.ack(batch.flush_id)
        return sum(batch.counts.values()) if added else 0

    def _prune(self) -> None:
        with self.connect() as conn, conn.transaction():
            conn.execute("DELETE FROM usage_flushes WHERE flushed_at < now() - %s", (LEDGER_KEEP,))
        self._last_prune = time.monotonic()


# --- the rules --------------------------------------------------------------------------------


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
        member = _member(API_CALLS, tenant_id, f"{now.astimezone(UTC):%Y-%m-%d}")
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
        raise ValueError(f"tenant {tenant_id!r} does not exist")
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


# --- leases: fewer round trips for busy tenants -----------------------------------------------

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
