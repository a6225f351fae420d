"""Quotas and rate limits with the in-process backend (no Redis, a stand-in database)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any

import pytest

from sensormine.limits.backends import MemoryBackend
from sensormine.limits.devices import QuotaExceeded
from sensormine.limits.quotas import Quotas
from sensormine.metering.calendar import month_label, next_month_start, seconds_until_next_month
from sensormine.metering.ledger import API_CALLS, UsageFlusher
from sensormine.tenancy.plans import PLANS, Plan, PlanError

NOW = datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC)
TINY = Plan("tiny", 10, 1, 10, hot_retention_days=7, lake_retention_days=90)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeDb:
    """Just enough of PostgreSQL for the quota code: usage rows, flush ids, events, a month's sum."""

    def __init__(self, usage_seed: int = 0) -> None:
        self.usage: dict[tuple[str, str, date], int] = {}
        self.flushes: set[str] = set()
        self.events: dict[str, tuple[str, str, dict]] = {}
        self.usage_seed = usage_seed
        self.fail_next_write = False

    @contextmanager
    def connect(self):
        yield FakeConn(self)


class _Result:
    def __init__(self, row: Any) -> None:
        self.row = row

    def fetchone(self) -> Any:
        return self.row


class FakeConn:
    def __init__(self, db: FakeDb) -> None:
        self.db = db

    @contextmanager
    def transaction(self):
        yield

    def execute(self, query: str, params: tuple = ()) -> _Result:
        if "sensormine_record_tenant_event" in query:
            tenant, kind, data, key = params
            if key in self.db.events:
                return _Result((False,))
            import json

            self.db.events[key] = (tenant, kind, json.loads(data))
            return _Result((True,))
        if query.startswith("SELECT coalesce(sum(value), 0) FROM usage"):
            return _Result((self.db.usage_seed,))
        if query.startswith("INSERT INTO usage_flushes"):
            if self.db.fail_next_write:
                self.db.fail_next_write = False
                raise RuntimeError("database down")
            if params[0] in self.db.flushes:
                return _Result(None)
            self.db.flushes.add(params[0])
            return _Result((params[0],))
        if query.startswith("DELETE FROM usage_flushes"):
            return _Result(None)
        raise AssertionError(f"unexpected query {query}")

    @contextmanager
    def cursor(self):
        yield self

    def executemany(self, query: str, rows: list[tuple]) -> None:
        for tenant, metric, day, n in rows:
            self.db.usage[(tenant, metric, day)] = self.db.usage.get((tenant, metric, day), 0) + n


def test_plans_have_rates() -> None:
    assert (PLANS["free"].rate_per_s, PLANS["free"].burst) == (10, 20)
    assert (PLANS["pro"].rate_per_s, PLANS["pro"].burst) == (100, 200)
    assert PLANS["enterprise"].api_calls_per_month is None and PLANS["enterprise"].burst == 20_000
    with pytest.raises(PlanError):
        Plan("odd", 1, 1, 1, 7, 7, rate_per_s=1)


def test_month_arithmetic() -> None:
    assert next_month_start(NOW) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_month_start(datetime(2026, 12, 31, 12, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert seconds_until_next_month(NOW) == 60
    assert seconds_until_next_month(datetime(2026, 11, 30, 23, 59, 59, 500_000, tzinfo=UTC)) == 1
    assert month_label(NOW) == "2026-11"


def test_memory_bucket_burst_refusal_and_refill() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    taken = [backend.take_token("acme", 10, 20) for _ in range(21)]
    assert [t.allowed for t in taken] == [True] * 20 + [False]
    assert taken[19].remaining == 0 and taken[20].retry_after_ms == 100
    clock.t += 0.05
    assert 50 <= backend.take_token("acme", 10, 20).retry_after_ms <= 51
    clock.t += 0.05
    assert backend.take_token("acme", 10, 20).allowed
    clock.t += 3600
    assert backend.take_token("acme", 10, 20).remaining == 19  # never more than the burst


def test_memory_bucket_is_atomic_across_threads() -> None:
    backend = MemoryBackend()
    allowed: list[int] = []
    workers = [
        threading.Thread(
            target=lambda: allowed.append(sum(backend.take_token("t", 0.001, 30).allowed for _ in range(50)))
        )
        for _ in range(8)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(allowed) == 30


def test_monthly_quota_warning_refusal_and_one_event_per_threshold() -> None:
    db = FakeDb()
    quotas = Quotas(MemoryBackend(), db.connect, clock=lambda: NOW)
    answers = [quotas.check_call("acme", "acme", TINY) for _ in range(10)]
    assert [a.warning is not None for a in answers] == [False] * 7 + [True] * 3
    with pytest.raises(QuotaExceeded) as err:
        quotas.check_call("acme", "acme", TINY)
    assert err.value.retry_after_s == 60
    assert "tiny" in err.value.detail and "10 API calls" in err.value.detail
    for _ in range(3):
        with pytest.raises(QuotaExceeded):
            quotas.check_call("acme", "acme", TINY)
    assert sorted(kind for _, kind, _ in db.events.values()) == ["quota.api_calls.exceeded", "quota.api_calls.warning"]


def test_rate_limit_refusal_is_not_counted() -> None:
    db = FakeDb()
    backend = MemoryBackend(clock=FakeClock())
    quotas = Quotas(backend, db.connect, clock=lambda: NOW)
    free = PLANS["free"]
    for _ in range(20):
        quotas.check_call("acme", "acme", free)
    with pytest.raises(QuotaExceeded) as err:
        quotas.check_call("acme", "acme", free)
    assert err.value.info["kind"] == "rate" and err.value.retry_after_s == 1
    assert backend.month_count("acme", "2026-11") == 20


def test_month_is_seeded_from_the_usage_table() -> None:
    db = FakeDb(usage_seed=9)
    quotas = Quotas(MemoryBackend(), db.connect, clock=lambda: NOW)
    assert quotas.check_call("acme", "acme", TINY).quota_used == 10
    with pytest.raises(QuotaExceeded):
        quotas.check_call("acme", "acme", TINY)


def test_flush_exactly_once_with_a_failed_write_and_a_lost_ack() -> None:
    db = FakeDb()
    backend = MemoryBackend()
    quotas = Quotas(backend, db.connect, clock=lambda: NOW)
    metered = Plan("metered", None, None, None, 7, None)
    for _ in range(7):
        quotas.check_call("acme", "acme", metered)
    db.fail_next_write = True
    with pytest.raises(RuntimeError):
        quotas.flusher.flush()  # moved to pending, the write failed
    assert len(backend.pending_batches()) == 1
    for _ in range(3):
        quotas.check_call("acme", "plant-1", metered)
    lost_ack = backend.take_batch(100)
    assert lost_ack is not None
    with db.connect() as conn:
        from sensormine.metering.ledger import write_batch

        assert write_batch(conn, lost_ack)  # written, but the process died before acknowledging it
    flusher = UsageFlusher(backend, db.connect)
    flusher.start()
    flusher.close()
    day = date(2026, 11, 30)
    assert db.usage == {("acme", API_CALLS, day): 7, ("plant-1", API_CALLS, day): 3}
    assert backend.pending_batches() == []
