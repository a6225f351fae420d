"""Reads raw points from the hot store under row-level security."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
import pyarrow as pa
from psycopg import sql

from sensormine.clients.postgres import tenant_scope
from sensormine.reading import rows_to_table

POINT_SCHEMA = pa.schema(
    [
        pa.field("tenant_id", pa.string()),
        pa.field("device_id", pa.string()),
        pa.field("metric", pa.string()),
        pa.field("ts", pa.timestamp("us", tz="UTC")),
        pa.field("value", pa.float64()),
        pa.field("quality", pa.int16()),
    ]
)


@dataclass(frozen=True)
class CompactedDay:
    """A tenant-day the lake holds, and whether the hot store may have rows of it the lake lacks.

    `late` is true when `hot_write_log` still holds a row of the day whose transaction is not
    visible in the compaction's snapshot, or when the compaction predates snapshots. `late_floor`
    is then the oldest such transaction id (xid8 text; None: no bound, every hot row of the day may
    be late): every late row has an xmin at or after it (docs/query.md "Late rows").
    """

    snapshot: str | None
    row_count: int
    late: bool = False
    late_floor: str | None = None


# One statement, so the compaction record and the log are read in one snapshot.
_COMPACTED_DAYS = (
    "SELECT c.day, c.hot_snapshot::text, c.row_count, c.hot_snapshot IS NULL OR l.txid IS NOT NULL, l.txid::text "
    "FROM lake_compactions c LEFT JOIN LATERAL ("
    "  SELECT w.txid FROM hot_write_log w WHERE w.tenant_id = c.tenant_id AND w.day = c.day "
    "  AND NOT pg_visible_in_snapshot(w.txid, c.hot_snapshot) ORDER BY w.txid LIMIT 1) l ON true "
    "WHERE c.tenant_id = %s AND c.day BETWEEN %s AND %s"
)


def compacted_days(conn: psycopg.Connection, tenant_id: str, first: date, last: date) -> dict[date, CompactedDay]:
    """Days of a tenant in [first, last] held by the lake, with their compaction snapshot and late-write state."""
    rows = conn.execute(_COMPACTED_DAYS, (tenant_id, first, last)).fetchall()
    return {d: CompactedDay(s, int(n), bool(late), floor) for d, s, n, late, floor in rows}


def late_days(conn: psycopg.Connection, tenant_id: str, days_with_snapshots: Mapping[date, str | None]) -> set[date]:
    """The compacted days (day -> compaction snapshot) that may have hot rows the lake lacks.

    A day is late when a hot-store transaction that wrote rows of it is not visible in the snapshot
    (its hot_write_log row survived the compaction), or when it was compacted before snapshots were
    recorded (snapshot None).
    """
    days = list(days_with_snapshots)
    if not days:
        return set()
    rows = conn.execute(
        "SELECT c.day FROM unnest(%s::date[], %s::text[]) AS c(day, snap) "
        "WHERE c.snap IS NULL OR EXISTS (SELECT 1 FROM hot_write_log w WHERE w.tenant_id = %s AND w.day = c.day "
        "  AND NOT pg_visible_in_snapshot(w.txid, c.snap::pg_snapshot))",
        (days, [days_with_snapshots[d] for d in days], tenant_id),
    ).fetchall()
    return {d for (d,) in rows}


def late_condition(day: CompactedDay) -> sql.Composable:
    """SQL condition on telemetry row `xmin` selecting every possibly late row of a late compacted day.

    A superset: rows the lake already holds may match too, and readers drop them by dedupe key.
    """
    if day.late_floor is None:
        return sql.SQL("true")
    return sql.SQL("sensormine_xid_at_or_after(xmin, {}::xid8)").format(sql.Literal(day.late_floor))


def _utc_day_start(dt: datetime) -> datetime:
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return datetime(dt.year, dt.month, dt.day, tzinfo=UTC)


def scan_ranges(
    start: datetime, end: datetime, compacted: Mapping[date, CompactedDay]
) -> list[tuple[datetime, datetime, CompactedDay | None]]:
    """The [lo, hi) pieces of [start, end) whose hot rows must be read: whole for days the lake does
    not hold (None), filtered by `late_condition` for late compacted days; other days are skipped."""
    out: list[tuple[datetime, datetime, CompactedDay | None]] = []
    lo = _utc_day_start(start)
    while lo < end:
        hi = lo + timedelta(days=1)
        piece = (max(lo, start), min(hi, end))
        day = compacted.get(lo.date())
        if day is None:
            if out and out[-1][2] is None and out[-1][1] == piece[0]:
                out[-1] = (out[-1][0], piece[1], None)  # contiguous hot days: one range
            else:
                out.append((*piece, None))
        elif day.late:
            out.append((*piece, day))
        lo = hi
    return out


def hot_points(
    conn: psycopg.Connection,
    visible: Sequence[str],
    tenant_id: str,
    device_ids: Sequence[str],
    metrics: Sequence[str] | None,
    start: datetime,
    end: datetime,
    compacted: Mapping[date, CompactedDay],
) -> pa.Table:
    """Points in [start, end) from the hot store, leaving out what the lake certainly holds.

    Days the lake does not hold are read whole. Of a compacted day, nothing is read unless the day
    is late (`CompactedDay.late`), and then only its rows at or after the oldest late transaction
    (they may have missed the lake); the caller dedupes them against the lake.
    """
    ranges = scan_ranges(start, end, compacted)
    if not ranges:
        return POINT_SCHEMA.empty_table()
    pieces = [
        sql.SQL("(t.ts >= {} AND t.ts < {}{})").format(
            sql.Literal(lo),
            sql.Literal(hi),
            sql.SQL("") if day is None else sql.SQL(" AND ") + late_condition(day),
        )
        for lo, hi, day in ranges
    ]
    query = sql.SQL(
        "SELECT t.tenant_id, t.device_id, t.metric, t.ts, t.value, t.quality FROM telemetry t "
        "WHERE t.tenant_id = %(tenant)s AND t.device_id = ANY(%(devices)s) AND ({ranges}){metric} "
        "ORDER BY t.device_id, t.metric, t.ts"
    ).format(
        ranges=sql.SQL(" OR ").join(pieces),
        metric=sql.SQL(" AND t.metric = ANY(%(metrics)s)") if metrics else sql.SQL(""),
    )
    params: dict[str, object] = {"tenant": tenant_id, "devices": list(device_ids)}
    if metrics:
        params["metrics"] = list(metrics)
    with tenant_scope(conn, visible):
        rows = conn.execute(query, params).fetchall()
    return rows_to_table(rows, POINT_SCHEMA)
