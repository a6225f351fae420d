"""Redis client: the one place that builds a connection to Redis (rate limits, quotas, usage counters).

`SENSORMINE_REDIS_URL` unset means no Redis: callers then use their in-process implementation
(single process only). Every key the platform writes starts with `key_prefix(settings)`, so
environments (and tests, each with its own `env`) sharing one Redis never see each other's keys.
"""

from __future__ import annotations

import redis

from sensormine.settings import Settings, get_settings

SOCKET_TIMEOUT_S = 2.0  # a request never hangs on a stalled Redis for longer than this


class RedisNotConfigured(RuntimeError):
    """Raised when a caller needs Redis and no URL is set."""


def redis_configured(settings: Settings | None = None) -> bool:
    """Whether a Redis URL is set."""
    return bool((settings or get_settings()).redis_url)


def make_redis(settings: Settings | None = None) -> redis.Redis:
    """A client (with its own connection pool, thread-safe) for the configured Redis; answers are str."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise RedisNotConfigured(
            "SENSORMINE_REDIS_URL is not set: run `sensormine services up` and eval the printed exports"
        )
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
    )


def key_prefix(settings: Settings | None = None) -> str:
    """The prefix of every key this environment writes: `sensormine:{env}:`."""
    settings = settings or get_settings()
    return f"sensormine:{settings.env}:"
