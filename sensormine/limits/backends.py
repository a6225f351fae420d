"""Where token buckets and counters live: Redis (shared by every API process) or process memory."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis

from sensormine.metering.ledger import API_CALLS, FlushBatch, parse_counts

REDIS_ERROR_LOG_EVERY_S = 60.0


TOKEN_EPSILON = 1e-6  # the bucket script keeps tokens to six decimals


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
        return None if payload is None else FlushBatch(flush_id, parse_counts(str(payload)))

    def pending_batches(self) -> list[FlushBatch]:
        pending: dict[str, str] = self.client.hgetall(self._pending)  # type: ignore[assignment]
        return [FlushBatch(fid, parse_counts(payload)) for fid, payload in sorted(pending.items())]

    def ack(self, flush_id: str) -> None:
        self.client.hdel(self._pending, flush_id)


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
        return FlushBatch(flush_id, parse_counts(payload))

    def pending_batches(self) -> list[FlushBatch]:
        with self._lock:
            return [FlushBatch(fid, parse_counts(p)) for fid, p in sorted(self._pending.items())]

    def ack(self, flush_id: str) -> None:
        with self._lock:
            self._pending.pop(flush_id, None)
