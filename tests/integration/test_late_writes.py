"""The late-write log (hot_write_log): readers scan a compacted day's hot rows only when a transaction
that wrote rows of it is not visible in the compaction's snapshot (docs/query.md "Late rows")."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, date, datetime

import psycopg
import pytest

import query.aggregate as planner
from lake.retention import apply_hot_retention
from lake.rollups import ROLLUP_1H, ROLLUP_1M, write_rollup
from lake.telemetry import compact_day
from query.aggregate import AggregateQuery, aggregate
from query.hot import compacted_days, late_days
from query.points import query_points
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import INGEST, connect
from sensormine.reading import Reading, datetime_to_us
from sensormine.settings import Settings
from tests.factories import make_tenant
from tests.integration.test_query_api import AGGS, close, reference

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 25)
NEXT = date(2026, 11, 26)
START = datetime(2026, 11, 25, tzinfo=UTC)
END = datetime(2026, 11, 27, tzinfo=UTC)
HOUR_US = 3_600_000_000


def day_us(d: date) -> int:
    return datetime_to_us(datetime(d.year, d.month, d.day, tzinfo=UTC))


def day_points(d: date, n: int = 300, seed: int = 1) -> list[Reading]:
    rng = random.Random(seed)
    return [
        Reading("acme", "d1", m, day_us(d) + ts, round(rng.uniform(-5, 5), 3), 0, day_us(d))
        for m in ("pressure", "temperature")
        for ts in sorted(rng.sample(range(0, 86_400_000_000, 1_000_000), n))
    ]


def query(width_us: int = HOUR_US, aggs: tuple[str, ...] = AGGS) -> AggregateQuery:
    return AggregateQuery("acme", ("d1",), None, START, END, width_us, aggs)


def answer(conn: psycopg.Connection, settings: Settings, q: AggregateQuery) -> tuple[dict[tuple, dict], dict]:
    result = aggregate(conn, settings, ["acme"], q)
    got = {
        (r["device_id"], r["metric"], datetime_to_us(r["bucket"])): {a: r[a] for a in q.aggs}
        for r in result.frame.to_dicts()
    }
    return got, result.plan


def assert_matches(got: dict[tuple, dict], points: list[Reading], q: AggregateQuery) -> None:
    want = reference(points, q.width_us, q.start, q.end)
    assert set(got) == set(want)
    for key, row in want.items():
        for agg in q.aggs:
            assert close(got[key][agg], row[agg]), (key, agg, got[key][agg], row[agg])


def log_rows(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT tenant_id, day FROM hot_write_log ORDER BY 1, 2").fetchall()


@pytest.fixture
def late_scans(monkeypatch: pytest.MonkeyPatch) -> list[list[date]]:
    """Every late-row scan the aggregate planner sends to PostgreSQL, as the days it covers."""
    calls: list[list[date]] = []
    real: Callable = planner._late_sql

    def spy(q: AggregateQuery, days: list[date], compacted: dict) -> object:
        calls.append(list(days))
        return real(q, days, compacted)

    monkeypatch.setattr(planner, "_late_sql", spy)
    return calls


@pytest.fixture
def compacted(settings: Settings, conn: psycopg.Connection) -> list[Reading]:
    """DAY compacted and rolled up, NEXT only in the hot store."""
    make_tenant(conn, "acme", ["d1"])
    points = day_points(DAY) + day_points(NEXT, 50, seed=2)
    HotStoreWriter(conn).write(points)
    conn.commit()
    assert log_rows(conn) == [("acme", DAY), ("acme", NEXT)]
    compact_day(conn, settings, "acme", DAY)
    write_rollup(settings, ROLLUP_1M, "acme", DAY)
    write_rollup(settings, ROLLUP_1H, "acme", DAY)
    conn.commit()
    # The compaction covered DAY's writes: only the uncompacted day keeps its log row.
    assert log_rows(conn) == [("acme", NEXT)]
    return points


def test_a_compacted_day_without_late_writes_is_not_scanned(
    settings: Settings, conn: psycopg.Connection, compacted: list[Reading], late_scans: list[list[date]]
) -> None:
    q = query(aggs=("avg", "min", "max", "count"))
    got, plan = answer(conn, settings, q)
    assert late_scans == [] and plan["late_days"] == [] and plan["late_rows"] == 0
    assert plan["rollup_days"] == {"telemetry_1h": [DAY.isoformat()]}
    assert_matches(got, compacted, q)
    assert late_days(conn, "acme", {d: c.snapshot for d, c in compacted_days(conn, "acme", DAY, NEXT).items()}) == set()
    raw = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert raw.late_days == [] and raw.hot_rows == 100 and raw.points.num_rows == len(compacted)
    # A redelivered batch of rows the hot store already has inserts nothing and logs nothing.
    HotStoreWriter(conn).write(compacted[:10])
    conn.commit()
    assert log_rows(conn) == [("acme", NEXT)]


def test_a_row_written_after_compaction_is_found_once_and_recompaction_clears_it(
    settings: Settings, conn: psycopg.Connection, compacted: list[Reading], late_scans: list[list[date]]
) -> None:
    # One new reading, and one the lake already holds (deduped by the writer): one late row.
    late = Reading("acme", "d1", "pressure", day_us(DAY) + 5 * HOUR_US + 1, 42.0, 0, day_us(NEXT))
    assert HotStoreWriter(conn).write([late, compacted[0]]).inserted == 1
    conn.commit()
    points = [*compacted, late]
    snaps = {d: c.snapshot for d, c in compacted_days(conn, "acme", DAY, NEXT).items()}
    assert late_days(conn, "acme", snaps) == {DAY}

    q = query()
    got, plan = answer(conn, settings, q)
    assert late_scans == [[DAY]] and plan["late_days"] == [DAY.isoformat()]
    assert plan["late_rows"] == 1 and plan["raw_lake_days"] == [DAY.isoformat()]
    assert_matches(got, points, q)
    raw = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert raw.late_days == [DAY] and raw.hot_rows == 101 and raw.points.num_rows == len(points)
    # Without first / last the day still comes from its rollup, and the late row is added to it once.
    rolled = query(aggs=("avg", "min", "max", "count"))
    got, plan = answer(conn, settings, rolled)
    assert plan["rollup_days"] == {"telemetry_1h": [DAY.isoformat()]} and plan["raw_lake_days"] == []
    assert plan["late_days"] == [DAY.isoformat()] and plan["late_rows"] == 1
    assert_matches(got, points, rolled)

    compact_day(conn, settings, "acme", DAY)
    conn.commit()
    assert log_rows(conn) == [("acme", NEXT)]
    late_scans.clear()
    got, plan = answer(conn, settings, q)
    assert late_scans == [] and plan["late_days"] == [] and plan["late_rows"] == 0
    assert_matches(got, points, q)
    raw = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert raw.late_days == [] and raw.points.num_rows == len(points)


def test_a_transaction_in_flight_during_compaction_is_late(
    settings: Settings, conn: psycopg.Connection, compacted: list[Reading]
) -> None:
    late = Reading("acme", "d1", "temperature", day_us(DAY) + 7 * HOUR_US + 3, -9.0, 0, day_us(NEXT))
    with connect(settings, role=INGEST) as other:
        # Opened before the compaction; the writer's COPY runs in a savepoint, so the row's xmin is a
        # subtransaction id, which the compaction's snapshot does not list as in progress.
        writer = HotStoreWriter(other)
        with other.transaction():
            writer.write([late])
            # Any later transaction that completes moves the snapshot's xmax past that subtransaction id.
            with psycopg.connect(settings.database_url, autocommit=True) as third:
                third.execute("SELECT pg_current_xact_id()")
            compact_day(conn, settings, "acme", DAY)
            conn.commit()
        # committed only now
    points = [*compacted, late]
    snap = compacted_days(conn, "acme", DAY, DAY)[DAY].snapshot
    # Testing each row's xmin against the snapshot would miss this row; the log does not.
    missed = conn.execute(
        "SELECT count(*) FROM telemetry WHERE metric = 'temperature' AND ts = %s "
        "AND NOT sensormine_in_snapshot(xmin, %s::pg_snapshot)",
        (datetime(2026, 11, 25, 7, 0, 0, 3, tzinfo=UTC), snap),
    ).fetchone()
    assert missed == (0,)
    assert late_days(conn, "acme", {DAY: snap}) == {DAY}
    assert log_rows(conn) == [("acme", DAY), ("acme", NEXT)]

    q = query(aggs=("avg", "count", "first", "last"))
    got, plan = answer(conn, settings, q)
    assert plan["late_days"] == [DAY.isoformat()] and plan["late_rows"] == 1
    assert_matches(got, points, q)
    raw = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert raw.late_days == [DAY] and raw.points.num_rows == len(points)

    compact_day(conn, settings, "acme", DAY)
    conn.commit()
    assert log_rows(conn) == [("acme", NEXT)]
    assert_matches(answer(conn, settings, q)[0], points, q)


def test_a_day_compacted_before_snapshots_is_late_and_dropping_a_hot_day_clears_its_log(
    settings: Settings, conn: psycopg.Connection, compacted: list[Reading]
) -> None:
    conn.execute("UPDATE lake_compactions SET hot_snapshot = NULL")
    conn.commit()
    assert compacted_days(conn, "acme", DAY, DAY)[DAY].late
    got, plan = answer(conn, settings, query())
    assert plan["late_days"] == [DAY.isoformat()] and plan["late_rows"] == 0  # all in the lake already
    assert_matches(got, compacted, query())
    # Read from the rollup, every hot row of the day is late and held by the lake: none counts twice.
    rolled = query(aggs=("avg", "min", "max", "count"))
    got, plan = answer(conn, settings, rolled)
    assert plan["rollup_days"] == {"telemetry_1h": [DAY.isoformat()]} and plan["late_rows"] == 0
    assert_matches(got, compacted, rolled)

    # Hot retention drops a verified day whole; its log rows go with it.
    conn.execute("UPDATE lake_compactions SET verified_rows = row_count")
    conn.execute("INSERT INTO hot_write_log (tenant_id, day, txid) VALUES ('acme', %s, '1')", (DAY,))
    conn.commit()
    decisions = {d.day: d for d in apply_hot_retention(conn, date(2027, 6, 1))}
    assert decisions[DAY].dropped, decisions[DAY].reason
    assert ("acme", DAY) not in log_rows(conn)
