"""StorageGate: a verdict is kept for `recheck_s` on a controllable clock, and a database that cannot
answer admits the readings (the snapshots enforce the quota anyway)."""

from __future__ import annotations

from datetime import date
from typing import Any

import psycopg

from sensormine.limits.storage import StorageGate

DAY = date(2026, 12, 5)


class FakeConnection:
    """Answers sensormine_storage_quota_usage with the bytes in `stored`; counts the queries."""

    def __init__(self, stored: dict[str, int], plan: str = "free") -> None:
        self.stored, self.plan, self.queries, self.closed = stored, plan, 0, False

    def execute(self, sql: str, params: tuple[Any, ...]) -> FakeConnection:
        assert "sensormine_storage_quota_usage" in sql and params[1] == DAY
        self.queries += 1
        tenant = params[0]
        self._row = (tenant, self.plan, self.stored[tenant], DAY) if tenant in self.stored else None
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._row

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_a_verdict_is_kept_for_the_recheck_interval() -> None:
    conn = FakeConnection({"tiny": 1_500_000_000, "acme": 10})
    now = [0.0]
    gate = StorageGate(lambda: conn, 60.0, clock=lambda: now[0], today=lambda: DAY)  # type: ignore[arg-type,return-value]
    refusal = gate.refusal("tiny")
    assert refusal is not None and refusal.startswith("storage quota exceeded: plan free allows 1 GB")
    assert gate.refusal("acme") is None and gate.refusal("ghost") is None
    conn.stored["tiny"] = 0  # data deleted, measured again
    now[0] = 59.0
    assert gate.refusal("tiny") is not None and conn.queries == 3
    now[0] = 60.0
    assert gate.refusal("tiny") is None and conn.queries == 4


def test_an_unlimited_plan_is_never_refused() -> None:
    conn = FakeConnection({"big": 10**15}, plan="enterprise")
    gate = StorageGate(lambda: conn, today=lambda: DAY)  # type: ignore[arg-type,return-value]
    assert gate.refusal("big") is None


def test_a_database_that_cannot_answer_admits_and_is_reconnected() -> None:
    attempts: list[FakeConnection] = []

    def connect() -> FakeConnection:
        if not attempts:
            attempts.append(FakeConnection({}))
            raise psycopg.OperationalError("connection refused")
        attempts.append(FakeConnection({"tiny": 2_000_000_000}))
        return attempts[-1]

    gate = StorageGate(connect, 0.0, today=lambda: DAY)  # type: ignore[arg-type]
    assert gate.refusal("tiny") is None  # admitted while the database is away
    assert gate.refusal("tiny") is not None  # a new connection, and the verdict
    gate.close()
    assert attempts[-1].closed
