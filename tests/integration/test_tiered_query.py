"""The query planner across the hot/lake boundary: every point once, late data included."""

from __future__ import annotations

from datetime import UTC, date, datetime

import psycopg
import pytest

from lake.telemetry import compact_day
from query.points import query_points
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.settings import Settings
from tests.factories import DAY_US, make_tenant, readings

pytestmark = pytest.mark.integration

DAY = date(2026, 11, 26)
NEXT_US = DAY_US + 86_400_000_000
START, END = datetime(2026, 11, 26, tzinfo=UTC), datetime(2026, 11, 28, tzinfo=UTC)


def keys(table) -> list[tuple]:
    return [(r["device_id"], r["metric"], r["ts"], r["value"]) for r in table.to_pylist()]


def test_compacted_day_late_rows_and_hot_day_are_each_counted_once(
    settings: Settings, conn: psycopg.Connection
) -> None:
    make_tenant(conn, "acme", ["d1"])
    writer = HotStoreWriter(conn)
    writer.write(readings("acme", "d1", 100))  # day 1, 200 points
    writer.write(readings("acme", "d1", 30, start_us=NEXT_US))  # day 2, hot only, 60 points
    conn.commit()
    before = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert before.lake_days == [] and before.points.num_rows == 260

    assert compact_day(conn, settings, "acme", DAY).rows == 200
    after = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert after.lake_days == [DAY]
    assert keys(after.points) == keys(before.points)
    assert after.lake_rows == 200
    assert after.hot_rows == 60  # rows already in the lake are not read from the hot store again

    # Late readings for the compacted day: served from the hot store until the next compaction.
    writer.write(readings("acme", "d1", 5, start_us=DAY_US + 500_000_000))
    conn.commit()
    late = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert late.points.num_rows == 270
    assert late.hot_rows == 70
    assert len(set(keys(late.points))) == 270

    compact_day(conn, settings, "acme", DAY)
    final = query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END)
    assert keys(final.points) == keys(late.points)
    assert (final.lake_rows, final.hot_rows) == (210, 60)


def test_metric_and_time_filters_apply_to_both_tiers(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    writer = HotStoreWriter(conn)
    writer.write(readings("acme", "d1", 10) + readings("acme", "d2", 10) + readings("acme", "d1", 10, start_us=NEXT_US))
    conn.commit()
    compact_day(conn, settings, "acme", DAY)
    start = datetime(2026, 11, 26, 0, 0, 3, tzinfo=UTC)
    end = datetime(2026, 11, 27, 0, 0, 2, tzinfo=UTC)
    got = query_points(conn, settings, ["acme"], "acme", ["d1"], ["pressure"], start, end)
    assert [(r[0], r[1], r[2].second, r[3]) for r in keys(got.points)] == (
        [("d1", "pressure", s, s + 0.1) for s in range(3, 10)] + [("d1", "pressure", s, s + 0.1) for s in range(2)]
    )


def test_other_tenants_are_invisible(settings: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["d1"])
    make_tenant(conn, "globex", ["d1"])
    HotStoreWriter(conn).write(readings("acme", "d1", 3) + readings("globex", "d1", 4))
    conn.commit()
    compact_day(conn, settings, "globex", DAY)
    assert query_points(conn, settings, ["acme"], "acme", ["d1"], None, START, END).points.num_rows == 6
    assert query_points(conn, settings, ["globex"], "globex", ["d1"], None, START, END).points.num_rows == 8
    with pytest.raises(PermissionError):
        query_points(conn, settings, ["acme"], "globex", ["d1"], None, START, END)


@pytest.mark.parametrize(
    ("xid", "visible"),
    [
        (97, True),  # below the snapshot's xmin (epoch 1): settled before it
        (103, True),  # between xmin and xmax, not in progress
        (101, False),  # in progress when the snapshot was taken
        (104, False),  # xmax itself: began after
        (5000, False),  # well after
        (4294967295, True),  # the previous epoch's last xid: long settled
    ],
)
def test_row_visibility_in_a_compaction_snapshot_across_epochs(
    conn: psycopg.Connection, xid: int, visible: bool
) -> None:
    snap = f"{(1 << 32) + 100}:{(1 << 32) + 104}:{(1 << 32) + 101}"
    got = conn.execute("SELECT sensormine_in_snapshot(%s::text::xid, %s::pg_snapshot)", (str(xid), snap)).fetchone()[0]
    assert got is visible
