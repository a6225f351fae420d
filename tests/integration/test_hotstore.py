"""The hot-store writer against the real PostgreSQL: COPY, partitions, dedupe, offsets, row-level security."""

from __future__ import annotations

from datetime import date

import psycopg
import pytest

from sensormine.clients.hotstore import HotStoreWriter, KafkaOffset, stored_offsets
from sensormine.clients.postgres import existing_partition_days, tenant_scope
from tests.factories import DAY_US, make_tenant, readings

pytestmark = pytest.mark.integration


def count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]


def test_copy_creates_partitions_and_writes_exact_rows(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    w = HotStoreWriter(conn)
    rows = readings("acme", "d1", 100) + readings("acme", "d1", 10, start_us=DAY_US + 86_400_000_000)
    result = w.write(rows)
    assert result.inserted == 220
    assert {date(2026, 11, 26), date(2026, 11, 27)} <= existing_partition_days(conn)
    got = conn.execute(
        "SELECT metric, value FROM telemetry WHERE ts = to_timestamp(%s / 1e6)", (DAY_US + 5_000_000,)
    ).fetchall()
    assert sorted(got) == [("pressure", 5.1), ("temperature", 5.0)]
    assert conn.execute("SELECT count(*) FROM telemetry_p20261127").fetchone()[0] == 20


def test_redelivered_batch_creates_no_duplicates(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    w = HotStoreWriter(conn)
    first = readings("acme", "d1", 50)
    assert w.write(first).inserted == 100
    overlapping = readings("acme", "d1", 80)  # 50 already there, 30 new
    result = w.write(overlapping + overlapping[:10])  # and 10 duplicates inside the batch itself
    assert (result.inserted, result.duplicates) == (60, 110)
    assert count(conn) == 160


def test_offsets_commit_with_rows(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    w = HotStoreWriter(conn, consumer_group="g1")
    w.write(readings("acme", "d1", 3), [KafkaOffset("t.acme.telemetry", 0, 17), KafkaOffset("t.acme.telemetry", 1, 4)])
    w.write([], [KafkaOffset("t.acme.telemetry", 0, 18)])
    assert stored_offsets(conn, "g1") == {("t.acme.telemetry", 0): 18, ("t.acme.telemetry", 1): 4}
    assert stored_offsets(conn, "other") == {}


def test_failed_write_keeps_neither_rows_nor_offsets(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    w = HotStoreWriter(conn, consumer_group="g1")
    bad = readings("acme", "d1", 5)
    bad[3] = bad[3]._replace(value=float("nan"), metric=None)  # type: ignore[arg-type]  # NOT NULL violation
    with pytest.raises(psycopg.Error):
        w.write(bad, [KafkaOffset("t", 0, 99)])
    conn.rollback()
    assert count(conn) == 0
    assert stored_offsets(conn, "g1") == {}


def test_row_level_security_isolates_tenants(conn: psycopg.Connection) -> None:
    make_tenant(conn, "parent", ["p1"])
    make_tenant(conn, "child", ["c1"], parent_id="parent")
    make_tenant(conn, "sibling", ["s1"], parent_id="parent")
    w = HotStoreWriter(conn)
    w.write(readings("parent", "p1", 1) + readings("child", "c1", 2) + readings("sibling", "s1", 3))
    conn.commit()

    def seen(visible: list[str]) -> dict[str, int]:
        with tenant_scope(conn, visible):
            return dict(conn.execute("SELECT tenant_id, count(*) FROM telemetry GROUP BY 1").fetchall())

    assert seen(["child"]) == {"child": 4}
    assert seen(["parent", "child", "sibling"]) == {"parent": 2, "child": 4, "sibling": 6}
    assert seen([]) == {}
    # The reader role cannot write, even inside its scope.
    with pytest.raises(psycopg.errors.InsufficientPrivilege), tenant_scope(conn, ["child"]):
        conn.execute("DELETE FROM telemetry")
    conn.rollback()
