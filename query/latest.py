"""The newest point per device and metric, over the hot store and the lake."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import polars as pl
import psycopg

from lake.telemetry import row_filter, telemetry_dataset
from query.aggregate import SERIES
from sensormine.clients.postgres import tenant_scope
from sensormine.settings import Settings

LATEST_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "device_id": pl.String,
    "metric": pl.String,
    "ts": pl.Datetime("us", "UTC"),
    "value": pl.Float64,
    "quality": pl.Int16,
}


_LATEST_SERIES_GIVEN = (
    "WITH flag AS ({lake_only}) "
    "SELECT flag.lake, x.* FROM flag LEFT JOIN LATERAL ("
    "  SELECT d.device_id, m.metric, l.ts, l.value, l.quality "
    "  FROM unnest(%(devices)s::text[]) AS d(device_id) CROSS JOIN unnest(%(metrics)s::text[]) AS m(metric) "
    "  CROSS JOIN LATERAL (SELECT ts, value, quality FROM telemetry t WHERE t.tenant_id = %(tenant)s "
    "    AND t.device_id = d.device_id AND t.metric = m.metric ORDER BY t.ts DESC LIMIT 1) l) x ON true"
)


# Each device's metrics by a skip scan of the primary key (one index probe per metric and
# partition), then the newest row of each series by a backward index scan that stops in the
# newest partition holding the series.
_LATEST_DISCOVER = (
    "WITH RECURSIVE s(device_id, metric) AS ("
    "  SELECT d.device_id, (SELECT min(t.metric) FROM telemetry t WHERE t.tenant_id = %(tenant)s "
    "    AND t.device_id = d.device_id) FROM {devices} AS d(device_id) "
    "  UNION ALL "
    "  SELECT s.device_id, (SELECT min(t.metric) FROM telemetry t WHERE t.tenant_id = %(tenant)s "
    "    AND t.device_id = s.device_id AND t.metric > s.metric) FROM s WHERE s.metric IS NOT NULL), "
    "flag AS ({lake_only}) "
    "SELECT flag.lake, x.* FROM flag LEFT JOIN LATERAL ("
    "  SELECT s.device_id, s.metric, l.ts, l.value, l.quality FROM s "
    "  CROSS JOIN LATERAL (SELECT ts, value, quality FROM telemetry t WHERE t.tenant_id = %(tenant)s "
    "    AND t.device_id = s.device_id AND t.metric = s.metric ORDER BY t.ts DESC LIMIT 1) l "
    "  WHERE s.metric IS NOT NULL) x ON true"
)


_ALL_DEVICES = "(SELECT id FROM devices WHERE tenant_id = %(tenant)s)"


_DEVICES_GIVEN = "unnest(%(devices)s::text[])"


# Whether the lake may hold series the hot store no longer has: a compacted day whose hot
# partition is gone (hot retention drops whole days, only once the lake holds them).
_LAKE_ONLY_DAYS = (
    "SELECT EXISTS (SELECT 1 FROM lake_compactions c WHERE c.tenant_id = %(tenant)s AND c.day < coalesce("
    "  (SELECT min(to_date(substr(p.relname, 12), 'YYYYMMDD')) FROM pg_inherits i "
    "   JOIN pg_class p ON p.oid = i.inhrelid WHERE i.inhparent = 'telemetry'::regclass), 'infinity'::date)) AS lake"
)


LatestRow = tuple[str, str, datetime, float, int]


@dataclass
class LatestResult:
    """The newest point per (device, metric) as (device_id, metric, ts, value, quality), sorted."""

    rows: list[LatestRow]
    lake_series: int = 0

    @property
    def frame(self) -> pl.DataFrame:
        """The rows as a DataFrame in LATEST_SCHEMA."""
        return pl.DataFrame(self.rows, schema=LATEST_SCHEMA, orient="row")


def latest(
    conn: psycopg.Connection,
    settings: Settings,
    visible: Sequence[str],
    tenant_id: str,
    device_ids: Sequence[str] | None,
    metrics: Sequence[str] | None,
) -> LatestResult:
    """The newest point of each series of the devices (all of the tenant's when None) and metrics (all when None).

    One statement, pipelined with the row-level-security setup, in the common case; the lake is read
    only for series the hot store lacks and only when the tenant has compacted days whose hot
    partition was dropped. Plain tuples, no DataFrame: this route is latency-bound.
    """
    if tenant_id not in visible:
        raise PermissionError(f"tenant {tenant_id!r} is not visible to this caller")
    params: dict[str, object] = {"tenant": tenant_id}
    if device_ids is not None:
        params["devices"] = list(device_ids)
    if metrics is not None and device_ids is not None:
        params["metrics"] = list(metrics)
        statement = _LATEST_SERIES_GIVEN.format(lake_only=_LAKE_ONLY_DAYS)
    else:
        devices_sql = _DEVICES_GIVEN if device_ids is not None else _ALL_DEVICES
        statement = _LATEST_DISCOVER.format(devices=devices_sql, lake_only=_LAKE_ONLY_DAYS)
    with conn.pipeline(), tenant_scope(conn, visible):
        fetched = conn.execute(statement, params).fetchall()  # type: ignore[arg-type]
    lake_may_hold_more = bool(fetched and fetched[0][0])
    wanted = None if metrics is None else set(metrics)
    rows: list[LatestRow] = [
        r[1:]  # type: ignore[misc]
        for r in fetched
        if r[1] is not None and (wanted is None or r[2] in wanted)
    ]
    result = LatestResult(rows)
    if lake_may_hold_more:
        devices = list(device_ids) if device_ids is not None else None
        if devices is None:
            with tenant_scope(conn, visible):
                devices = [r[0] for r in conn.execute("SELECT id FROM devices WHERE tenant_id = %s", (tenant_id,))]
        if devices:
            lake = _lake_latest(settings, tenant_id, devices, metrics)
            # The hot store's answer wins for a series it holds (its days are newer than the dropped ones).
            have = {(r[0], r[1]) for r in rows}
            extra = [r for r in lake.iter_rows() if (r[0], r[1]) not in have]
            result.lake_series = len(extra)
            rows += extra  # type: ignore[arg-type]
    result.rows = sorted(rows, key=lambda r: (r[0], r[1]))
    return result


def _lake_latest(
    settings: Settings, tenant_id: str, device_ids: Sequence[str], metrics: Sequence[str] | None
) -> pl.DataFrame:
    dataset = telemetry_dataset(settings, [tenant_id])
    table = dataset.to_table(
        columns=list(LATEST_SCHEMA),
        filter=row_filter([tenant_id], list(device_ids), list(metrics) if metrics else None),
    )
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    if frame.height == 0:
        return pl.DataFrame(schema=LATEST_SCHEMA)
    return (
        frame.cast(LATEST_SCHEMA)  # type: ignore[arg-type]
        .sort("ts")
        .group_by(SERIES)
        .agg(pl.all().last())
        .select(list(LATEST_SCHEMA))
    )
