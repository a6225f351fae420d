"""Reads raw points from the hot store under row-level security."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime

import psycopg
import pyarrow as pa

from sensormine.db import tenant_scope
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


def compacted_days(conn: psycopg.Connection, tenant_id: str, first: date, last: date) -> dict[date, str | None]:
    """Days of a tenant held by the lake, with the hot-store snapshot their compaction read."""
    rows = conn.execute(
        "SELECT day, hot_snapshot::text FROM lake_compactions WHERE tenant_id = %s AND day BETWEEN %s AND %s",
        (tenant_id, first, last),
    ).fetchall()
    return {d: x for d, x in rows}


def hot_points(
    conn: psycopg.Connection,
    visible: Sequence[str],
    tenant_id: str,
    device_ids: Sequence[str],
    metrics: Sequence[str] | None,
    start: datetime,
    end: datetime,
    compacted: dict[date, str | None],
) -> pa.Table:
    """Points in [start, end) from the hot store, leaving out what the lake certainly holds.

    For a compacted day only rows not visible in the compaction's snapshot are read (they may
    have missed the lake); the caller dedupes them against the lake.
    """
    days = list(compacted)
    query = (
        "SELECT t.tenant_id, t.device_id, t.metric, t.ts, t.value, t.quality FROM telemetry t "
        "LEFT JOIN unnest(%(days)s::date[], %(snaps)s::text[]) AS c(day, snap) "
        "  ON c.day = (t.ts AT TIME ZONE 'UTC')::date "
        "WHERE t.tenant_id = %(tenant)s AND t.device_id = ANY(%(devices)s) AND t.ts >= %(start)s AND t.ts < %(end)s "
        "  AND (c.day IS NULL OR c.snap IS NULL OR NOT sensormine_in_snapshot(t.xmin, c.snap::pg_snapshot)) "
    )
    params: dict[str, object] = {
        "days": days,
        "snaps": [compacted[d] for d in days],
        "tenant": tenant_id,
        "devices": list(device_ids),
        "start": start,
        "end": end,
    }
    if metrics:
        query += " AND t.metric = ANY(%(metrics)s)"
        params["metrics"] = list(metrics)
    query += " ORDER BY t.device_id, t.metric, t.ts"
    with tenant_scope(conn, visible):
        cur = conn.execute(query, params)
        rows = cur.fetchall()
    return rows_to_table(rows, POINT_SCHEMA)
