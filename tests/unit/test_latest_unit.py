"""The latest-value cache's merge rules, payload chunking, CopyBatch.newest, and call leases."""

from __future__ import annotations

import json

import pytest

from sensormine.clients.hotstore import CopyBatch
from sensormine.clients.latest import MAX_PAYLOAD, LatestCache, newest_per_series, payloads
from sensormine.limits.backends import MemoryBackend
from sensormine.limits.devices import QuotaExceeded
from sensormine.limits.leases import CallLeases, lease_size
from sensormine.limits.quotas import Quotas
from sensormine.reading import Reading
from sensormine.tenancy.plans import get_plan


def test_newer_points_win_in_any_order() -> None:
    cache = LatestCache()
    cache.listening = True
    gen = cache.begin_fill("t", "d")
    cache.apply([("t", "d", "temp", 200, 2.0, 0)])  # pushed while the database read runs
    cache.fill("t", "d", {"temp": (100, 1.0, 0), "rpm": (50, 9.0, 1)}, gen)
    assert cache.get("t", "d") == {"temp": (200, 2.0, 0), "rpm": (50, 9.0, 1)}
    cache.apply([("t", "d", "temp", 150, 1.5, 0), ("t", "d", "rpm", 60, 8.0, 0), ("t", "other", "x", 1, 1.0, 0)])
    assert cache.get("t", "d") == {"temp": (200, 2.0, 0), "rpm": (60, 8.0, 0)}
    assert cache.get("t", "other") is None  # never asked for: not tracked


def test_a_reset_discards_fills_that_began_before_it_and_no_answers_while_deaf() -> None:
    cache = LatestCache()
    cache.listening = True
    gen = cache.begin_fill("t", "d")
    cache.reset()  # the listener reconnected: notifications may have been missed
    cache.fill("t", "d", {"temp": (100, 1.0, 0)}, gen)
    assert cache.get("t", "d") is None
    cache.fill("t", "d", {"temp": (100, 1.0, 0)}, cache.begin_fill("t", "d"))
    assert cache.get("t", "d") == {"temp": (100, 1.0, 0)}
    cache.listening = False
    assert cache.get("t", "d") is None


def test_payloads_stay_under_the_notification_limit_and_round_trip() -> None:
    points = [("tenant", f"device-{i}", "temperature", 1_700_000_000_000_000 + i, i / 3, 0) for i in range(2000)]
    chunks = payloads(points)
    assert len(chunks) > 1 and all(len(c.encode()) <= MAX_PAYLOAD for c in chunks)
    assert [tuple(p) for c in chunks for p in json.loads(c)] == points


def test_copy_batch_newest_matches_the_readings() -> None:
    readings = [
        Reading("t", d, m, ts, float(ts % 97), ts % 3, 0)
        for d in ("a", "b")
        for m in ("x", "y")
        # out of order, across two UTC days, and one before 2000 (a negative PostgreSQL timestamp)
        for ts in (1_700_000_000_000_000, 1_700_090_000_000_000, 1_699_000_000_000_000, 900_000_000_000_000)
    ]
    batch = CopyBatch()
    batch.add_readings(readings)
    expected = newest_per_series((r.tenant_id, r.device_id, r.metric, r.ts, r.value, r.quality) for r in readings)
    assert sorted(batch.newest()) == sorted(expected)
    old = CopyBatch()
    old.add_readings([Reading("t", "a", "x", ts, 1.0, 0, 0) for ts in (800_000_000_000_000, 900_000_000_000_000)])
    assert old.newest() == [("t", "a", "x", 900_000_000_000_000, 1.0, 0)]


def _quotas(backend: MemoryBackend) -> Quotas:
    def no_db() -> None:
        raise AssertionError("the month counter is seeded in these tests")

    backend.count_call("acme", _month(), "seed", None, 0, 3600, 0, force=True)
    return Quotas(backend, no_db)  # type: ignore[arg-type]


def _month() -> str:
    from datetime import UTC, datetime

    from sensormine.metering.calendar import month_label

    return month_label(datetime.now(UTC))


def test_leases_spend_taken_tokens_locally_and_count_every_call() -> None:
    backend = MemoryBackend(clock=lambda: 0.0)  # a frozen clock: the bucket never refills
    plan = get_plan("enterprise")
    leases = CallLeases(_quotas(backend), clock=lambda: 0.0)
    n = lease_size(plan)
    assert n > 1
    first = leases.admit("acme", "acme", plan)
    assert first.tokens == n
    local = [leases.try_local("acme", "acme", plan) for _ in range(n + 5)]
    assert sum(a is not None for a in local) == n - 1  # the lease, and not one call more
    probe = backend.take_token("acme", plan.rate_per_s or 1, plan.burst or 1)  # takes one more itself
    assert probe.remaining == (plan.burst or 0) - n - 1
    leases.flush()
    assert backend.month_count("acme", _month()) == n  # every admitted call counted once


def test_slow_plans_check_every_call_exactly() -> None:
    backend = MemoryBackend(clock=lambda: 0.0)
    plan = get_plan("free")
    assert lease_size(plan) == 1
    leases = CallLeases(_quotas(backend), clock=lambda: 0.0)
    for _ in range(plan.burst or 0):
        leases.admit("acme", "acme", plan)
        assert leases.try_local("acme", "acme", plan) is None
    with pytest.raises(QuotaExceeded, match="too many requests"):
        leases.admit("acme", "acme", plan)
