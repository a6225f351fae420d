"""One query over both tiers: the lake for compacted tenant-days, the hot store for the rest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import polars as pl
import psycopg
import pyarrow as pa

from lake.telemetry import read_telemetry
from query.hot import POINT_SCHEMA, compacted_days, hot_points
from sensormine.clients.postgres import tenant_scope
from sensormine.settings import Settings


@dataclass
class TieredResult:
    """Points sorted by device, metric, ts, and which days came from which tier."""

    points: pa.Table
    lake_days: list[date] = field(default_factory=list)
    late_days: list[date] = field(default_factory=list)
    """Compacted days whose hot rows were scanned because they may have late rows (hot_write_log)."""
    hot_rows: int = 0
    lake_rows: int = 0


def _utc_date(dt: datetime) -> date:
    return (dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)).date()


def query_points(
    conn: psycopg.Connection,
    settings: Settings,
    visible: Sequence[str],
    tenant_id: str,
    device_ids: Sequence[str],
    metrics: Sequence[str] | None,
    start: datetime,
    end: datetime,
) -> TieredResult:
    """Raw points of one tenant's devices in [start, end), each counted once whichever tier holds it."""
    if tenant_id not in visible:
        raise PermissionError(f"tenant {tenant_id!r} is not visible to this caller")
    first, last = _utc_date(start), _utc_date(end - timedelta(microseconds=1))
    with tenant_scope(conn, visible):
        compacted = compacted_days(conn, tenant_id, first, last)
    hot = hot_points(conn, visible, tenant_id, device_ids, metrics, start, end, compacted)
    result = TieredResult(
        points=hot,
        lake_days=sorted(compacted),
        late_days=sorted(d for d, c in compacted.items() if c.late),
        hot_rows=hot.num_rows,
    )
    if not compacted:
        return result
    lake = (
        read_telemetry(
            settings,
            [tenant_id],
            device_ids=list(device_ids),
            metrics=list(metrics) if metrics else None,
            start=start,
            end=end,
            days=sorted(compacted),
        )
        .select(POINT_SCHEMA.names)
        .cast(POINT_SCHEMA)
    )
    result.lake_rows = lake.num_rows
    # A row written around a compaction can be in both tiers: keep one (the lake's) per dedupe key.
    both = pl.from_arrow(pa.concat_tables([lake, hot]))
    assert isinstance(both, pl.DataFrame)
    merged = both.unique(subset=["device_id", "metric", "ts"], keep="first", maintain_order=True).sort(
        ["device_id", "metric", "ts"]
    )
    result.points = merged.to_arrow().cast(POINT_SCHEMA)
    return result
