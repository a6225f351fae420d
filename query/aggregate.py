"""The aggregate query planner over both tiers, gap filling, and the latest value per series.

One request (tenant, devices, metrics, [start, end), bucket width, aggregates, fill) is answered
from partial aggregates that are combined per (device, metric, bucket):

- compacted tenant-days come from the lake: from the rollup tables `telemetry_1h` / `telemetry_1m`
  when the width is a multiple of the rollup's, every requested aggregate combines from rollup
  partials (not stddev), the rollup partition is complete (its readings add up to the day's
  `lake_compactions.row_count`); from the raw lake table otherwise (and for the unaligned edges of
  the range);
- days the lake does not hold are aggregated by PostgreSQL (date_bin on the Unix epoch);
- late rows of compacted days (written by a transaction not visible in the compaction's hot
  snapshot) are read raw, and those the lake already holds are dropped (checked against the lake's
  rows in the late rows' time span), so a point (tenant, device, metric, ts) counts once whether its
  day is read from a rollup or raw; only days the late-write log `hot_write_log` marks are scanned
  for them (query.hot, docs/query.md "Late rows").

Buckets are aligned to the Unix epoch in UTC. No FastAPI here: serving/routes/query.py wraps it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from lake.rollups import ROLLUP_1H, ROLLUP_1M, Rollup
from lake.storage import open_table
from lake.telemetry import read_telemetry, row_filter
from query.hot import CompactedDay, compacted_days, late_condition
from sensormine.clients.postgres import tenant_scope
from sensormine.reading import datetime_to_us
from sensormine.settings import Settings

AGGS = ("avg", "min", "max", "sum", "count", "first", "last", "stddev")


FILLS = ("none", "null", "previous", "linear")


ROLLUP_AGGS = frozenset({"avg", "min", "max", "sum", "count", "first", "last"})
"""Aggregates that combine exactly from rollup partials; stddev needs the raw values (see docs/query.md)."""


KEYS = ["device_id", "metric", "bucket"]


SERIES = ["device_id", "metric"]


US = 1_000_000


DAY_US = 86_400 * US


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


PARTIAL_SCHEMA = {
    "device_id": pl.String,
    "metric": pl.String,
    "bucket": pl.Int64,
    "count": pl.Int64,
    "sum": pl.Float64,
    "min": pl.Float64,
    "max": pl.Float64,
    "m2": pl.Float64,
    "first_ts": pl.Int64,
    "first": pl.Float64,
    "last_ts": pl.Int64,
    "last": pl.Float64,
}
"""One partial aggregate per (device, metric, output bucket) and source: m2 is the sum of squared
deviations from the partial's own mean (null when stddev is not asked for); first_ts / last_ts
order first / last across partials."""


class QueryError(ValueError):
    """A request the planner cannot answer; the message says what to change."""


@dataclass(frozen=True)
class AggregateQuery:
    """What to aggregate: one tenant's devices and metrics in [start, end), in buckets of `width_us`."""

    tenant_id: str
    device_ids: tuple[str, ...]
    metrics: tuple[str, ...] | None
    start: datetime
    end: datetime
    width_us: int
    aggs: tuple[str, ...] = ("avg",)
    fill: str = "none"

    @property
    def start_us(self) -> int:
        """Inclusive start in Unix microseconds."""
        return datetime_to_us(self.start)

    @property
    def end_us(self) -> int:
        """Exclusive end in Unix microseconds."""
        return datetime_to_us(self.end)

    @property
    def first_bucket_us(self) -> int:
        """The epoch-aligned bucket holding `start`."""
        return self.start_us // self.width_us * self.width_us

    @property
    def bucket_count(self) -> int:
        """Buckets per series in the range (the first may start before `start`)."""
        return max(0, math.ceil((self.end_us - self.first_bucket_us) / self.width_us))


@dataclass
class AggregateResult:
    """Aggregates in long form (device_id, metric, bucket, one column per aggregate), and how they were read."""

    frame: pl.DataFrame
    rollup_days: dict[str, list[date]] = field(default_factory=dict)
    raw_lake_days: list[date] = field(default_factory=list)
    hot_spans: list[tuple[datetime, datetime]] = field(default_factory=list)
    late_rows: int = 0
    late_days: list[date] = field(default_factory=list)
    """Compacted days whose hot rows were scanned for late rows (those hot_write_log marks as late)."""

    @property
    def plan(self) -> dict[str, object]:
        """A description of the sources read, for the response."""
        return {
            "rollup_days": {k: [d.isoformat() for d in v] for k, v in self.rollup_days.items()},
            "raw_lake_days": [d.isoformat() for d in self.raw_lake_days],
            "hot_ranges": [[a.isoformat(), b.isoformat()] for a, b in self.hot_spans],
            "late_rows": self.late_rows,
            "late_days": [d.isoformat() for d in self.late_days],
        }


def empty_partials() -> pl.DataFrame:
    """No partials, in PARTIAL_SCHEMA."""
    return pl.DataFrame(schema=PARTIAL_SCHEMA)


def raw_partials(points: pl.DataFrame, width_us: int) -> pl.DataFrame:
    """Partials of raw points (device_id, metric, ts as Int64 microseconds, value), one per output bucket."""
    if points.height == 0:
        return empty_partials()
    value = pl.col("value")
    return (
        points.lazy()
        .select("device_id", "metric", pl.col("ts").cast(pl.Int64), "value")
        .sort("device_id", "metric", "ts")
        .with_columns(bucket=pl.col("ts").floordiv(width_us) * width_us)
        .group_by(KEYS, maintain_order=True)
        .agg(
            count=pl.len().cast(pl.Int64),
            sum=value.sum(),
            min=value.min(),
            max=value.max(),
            m2=value.var(ddof=0) * pl.len(),
            first_ts=pl.col("ts").first(),
            first=value.first(),
            last_ts=pl.col("ts").last(),
            last=value.last(),
        )
        .select(list(PARTIAL_SCHEMA))
        .cast(PARTIAL_SCHEMA)  # type: ignore[arg-type]
        .collect()
    )


def rollup_partials(rows: pl.DataFrame, width_us: int, rollup: Rollup) -> pl.DataFrame:
    """Partials from rollup rows (ROLLUP_SCHEMA): each rollup bucket lies inside one output bucket.

    first_ts / last_ts are the rollup bucket's bounds: only partials of disjoint time ranges are
    ever combined with them when first or last is asked for (the planner then reads a day with late
    rows raw), so they order correctly.
    """
    if rows.height == 0:
        return empty_partials()
    fine = int(rollup.width.total_seconds()) * US
    ts = pl.col("bucket").cast(pl.Int64)
    return (
        rows.lazy()
        .with_columns(fine=ts)
        .select(
            "device_id",
            "metric",
            bucket=pl.col("fine").floordiv(width_us) * width_us,
            count=pl.col("count"),
            sum=pl.col("sum"),
            min=pl.col("min"),
            max=pl.col("max"),
            m2=pl.lit(None, pl.Float64),
            first_ts=pl.col("fine"),
            first=pl.col("first"),
            last_ts=pl.col("fine") + (fine - 1),
            last=pl.col("last"),
        )
        .cast(PARTIAL_SCHEMA)  # type: ignore[arg-type]
        .collect()
    )


def combine_partials(partials: pl.DataFrame) -> pl.DataFrame:
    """One row per (device, metric, bucket): counts and sums add, min/max of the partials, first/last by time,
    and m2 by the parallel-variance formula (Chan et al.)."""
    if partials.height == 0:
        return empty_partials()
    mean_i = pl.col("sum") / pl.col("count")
    mean = pl.col("sum").sum().over(KEYS) / pl.col("count").sum().over(KEYS)
    return (
        partials.lazy()
        .with_columns(dev2=pl.col("count") * (mean_i - mean) ** 2)
        .group_by(KEYS)
        .agg(
            count=pl.col("count").sum(),
            sum=pl.col("sum").sum(),
            min=pl.col("min").min(),
            max=pl.col("max").max(),
            # null as soon as one partial lacks it (never happens when stddev was asked for)
            m2=pl.when(pl.col("m2").null_count() == 0).then(pl.col("m2").sum() + pl.col("dev2").sum()),
            first_ts=pl.col("first_ts").min(),
            first=pl.col("first").sort_by("first_ts").first(),
            last_ts=pl.col("last_ts").max(),
            last=pl.col("last").sort_by("last_ts").last(),
        )
        .sort(KEYS)
        .select(list(PARTIAL_SCHEMA))
        .collect()
    )


def finalize(combined: pl.DataFrame, aggs: Sequence[str]) -> pl.DataFrame:
    """device_id, metric, bucket (aware UTC datetime), then the requested aggregates in order."""
    count = pl.col("count")
    exprs = {
        "avg": pl.col("sum") / count,
        "min": pl.col("min"),
        "max": pl.col("max"),
        "sum": pl.col("sum"),
        "count": count,
        "first": pl.col("first"),
        "last": pl.col("last"),
        "stddev": pl.when(count > 1).then((pl.col("m2").clip(lower_bound=0.0) / (count - 1)).sqrt()),
    }
    return combined.select(
        "device_id",
        "metric",
        pl.col("bucket").cast(pl.Datetime("us", "UTC")),
        *(exprs[a].alias(a) for a in aggs),
        pl.col("count").alias("_n"),
    )


def fill_gaps(frame: pl.DataFrame, query: AggregateQuery) -> pl.DataFrame:
    """Apply the query's fill mode to finalized rows (with the internal `_n` count column).

    none: only buckets with data. null: every bucket of the range for each series with data, empty
    ones null (count 0). previous: empty buckets carry the last earlier value forward. linear:
    empty buckets interpolate between the neighbouring non-empty buckets by bucket time; leading
    and trailing gaps stay null. count is always 0 in an empty bucket.
    """
    if query.fill == "none" or frame.height == 0:
        return frame
    grid = pl.DataFrame(
        {
            "bucket": pl.int_range(
                query.first_bucket_us, query.end_us, query.width_us, dtype=pl.Int64, eager=True
            ).cast(pl.Datetime("us", "UTC"))
        }
    )
    series = frame.select(SERIES).unique(maintain_order=True)
    full = (
        series.join(grid, how="cross")
        .join(frame, on=KEYS, how="left")
        .sort(KEYS)
        .with_columns(pl.col("_n").fill_null(0))
    )
    if "count" in full.columns:
        full = full.with_columns(pl.col("count").fill_null(0))
    values = [a for a in query.aggs if a != "count"]
    if query.fill == "null" or not values:
        return full
    empty = pl.col("_n") == 0
    if query.fill == "previous":
        filled = [pl.col(a).forward_fill().over(SERIES) for a in values]
    else:
        # Buckets are evenly spaced, so interpolating by position is interpolating by bucket time.
        filled = [pl.col(a).interpolate().over(SERIES) for a in values]
    return full.with_columns(
        pl.when(empty).then(f).otherwise(pl.col(a)).alias(a) for a, f in zip(values, filled, strict=True)
    )


Compaction = CompactedDay
"""A compacted tenant-day: the hot snapshot its compaction read, the rows the lake holds, and whether
hot_write_log says the hot store may have rows of it the lake lacks (see sensormine.hotquery)."""


def compactions(conn: psycopg.Connection, tenant_id: str, first: date, last: date) -> dict[date, Compaction]:
    """The tenant's compacted days in [first, last], with their late-write state."""
    return compacted_days(conn, tenant_id, first, last)


def _days(start_us: int, end_us: int) -> list[date]:
    first, last = start_us // DAY_US, (end_us - 1) // DAY_US
    return [(EPOCH + timedelta(days=d)).date() for d in range(first, last + 1)]


def _day_us(day: date) -> int:
    return (day - EPOCH.date()).days * DAY_US


def _us_dt(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def _spans(days: Sequence[date], start_us: int, end_us: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges covering `days` (sorted), clipped to [start_us, end_us)."""
    spans: list[list[int]] = []
    for d in days:
        lo, hi = max(_day_us(d), start_us), min(_day_us(d) + DAY_US, end_us)
        if spans and spans[-1][1] == lo:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    return [(a, b) for a, b in spans if a < b]


def _hot_aggregate_sql(query: AggregateQuery, n_spans: int) -> str:
    wants = set(query.aggs)
    m2 = "var_pop(value) * count(*)" if "stddev" in wants else "NULL::float8"
    first = (
        "(extract(epoch FROM min(ts)) * 1000000)::bigint, (array_agg(value ORDER BY ts))[1]"
        if "first" in wants
        else "NULL::bigint, NULL::float8"
    )
    last = (
        "(extract(epoch FROM max(ts)) * 1000000)::bigint, (array_agg(value ORDER BY ts DESC))[1]"
        if "last" in wants
        else "NULL::bigint, NULL::float8"
    )
    metric = " AND metric = ANY(%(metrics)s)" if query.metrics is not None else ""
    ranges = " OR ".join(f"(ts >= %(lo{i})s AND ts < %(hi{i})s)" for i in range(n_spans))
    # Grouped by the bucket's timestamp, turned into microseconds once per bucket: the numeric
    # arithmetic of extract() per row cost about a third of a 1 M-row aggregate.
    return (
        "SELECT device_id, metric, (extract(epoch FROM b) * 1000000)::bigint, n, s, lo, hi, m2, ft, fv, lt, lv FROM ("
        "SELECT device_id, metric, date_bin(%(width)s, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00') AS b, "
        f"count(*), sum(value), min(value), max(value), {m2}, {first}, {last} "
        "FROM telemetry WHERE tenant_id = %(tenant)s AND device_id = ANY(%(devices)s)"
        f"{metric} AND ({ranges}) GROUP BY 1, 2, 3) AS g (device_id, metric, b, n, s, lo, hi, m2, ft, fv, lt, lv)"
    )


_LATE_ROWS = (
    "SELECT device_id, metric, (extract(epoch FROM ts) * 1000000)::bigint, value FROM telemetry "
    "WHERE tenant_id = %(tenant)s AND device_id = ANY(%(devices)s) AND ts >= {lo} AND ts < {hi}{metric}{visible}"
)


def _late_sql(query: AggregateQuery, days: Sequence[date], compacted: dict[date, Compaction]) -> sql.Composed:
    """Possibly late rows of late compacted days, one UNION ALL branch per day.

    Only days with a hot_write_log row not visible in their compaction's snapshot get here; of those,
    the rows at or after the oldest such transaction (`late_condition`, a literal folded at plan time).
    """
    metric = " AND metric = ANY(%(metrics)s)" if query.metrics is not None else ""
    branches = []
    for d in days:
        branches.append(
            sql.SQL(_LATE_ROWS).format(
                lo=sql.Literal(_us_dt(max(query.start_us, _day_us(d)))),
                hi=sql.Literal(_us_dt(min(query.end_us, _day_us(d) + DAY_US))),
                metric=sql.SQL(metric),
                visible=sql.SQL(" AND ") + late_condition(compacted[d]),
            )
        )
    return sql.SQL(" UNION ALL ").join(branches)


def _points_frame(rows: list[tuple[object, ...]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"device_id": pl.String, "metric": pl.String, "ts": pl.Int64, "value": pl.Float64}, orient="row"
    )


def late_scan_days(query: AggregateQuery, compacted: dict[date, Compaction]) -> list[date]:
    """The compacted days of the query's range whose hot rows must be scanned for late rows."""
    return sorted(
        d for d, c in compacted.items() if c.late and query.start_us < _day_us(d) + DAY_US and _day_us(d) < query.end_us
    )


def hot_sources(
    conn: psycopg.Connection,
    visible: Sequence[str],
    query: AggregateQuery,
    compacted: dict[date, Compaction],
    hot_spans: list[tuple[int, int]],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Partials of the days the lake does not hold (aggregated by PostgreSQL), and the late raw rows of
    compacted days (device_id, metric, ts, value), read in one transaction under row-level security."""
    params: dict[str, object] = {
        "tenant": query.tenant_id,
        "devices": list(query.device_ids),
        "width": timedelta(microseconds=query.width_us),
    }
    if query.metrics is not None:
        params["metrics"] = list(query.metrics)
    # Compacted days without a surviving hot_write_log row are not scanned at all.
    days = late_scan_days(query, compacted)
    partials, late = empty_partials(), _points_frame([])
    with tenant_scope(conn, visible):
        if hot_spans:
            for i, (lo, hi) in enumerate(hot_spans):
                params[f"lo{i}"], params[f"hi{i}"] = _us_dt(lo), _us_dt(hi)
            rows = conn.execute(_hot_aggregate_sql(query, len(hot_spans)), params).fetchall()  # type: ignore[arg-type]
            partials = pl.DataFrame(rows, schema=PARTIAL_SCHEMA, orient="row")
        if days:
            late = _points_frame(conn.execute(_late_sql(query, days, compacted), params).fetchall())
    return partials, late


def _lake_points(settings: Settings, query: AggregateQuery, days: Sequence[date], lo: int, hi: int) -> pl.DataFrame:
    """Raw lake points of compacted `days` in [lo, hi) (device_id, metric, ts as Int64 us, value)."""
    if not days or lo >= hi:
        return _points_frame([])
    table = read_telemetry(
        settings,
        [query.tenant_id],
        device_ids=list(query.device_ids),
        metrics=list(query.metrics) if query.metrics is not None else None,
        start=_us_dt(lo),
        end=_us_dt(hi),
        days=days,
    ).select(["device_id", "metric", "ts", "value"])
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.with_columns(pl.col("ts").cast(pl.Int64))


def _rollup_complete(settings: Settings, rollup: Rollup, tenant_id: str, day: date, expected: int) -> bool:
    """Whether the rollup partition counts every reading the lake holds for the tenant-day."""
    table = open_table(settings, rollup.name)
    if table is None:
        return False
    dataset = table.to_pyarrow_dataset(partitions=[("tenant_id", "=", tenant_id), ("date", "=", day.isoformat())])
    counts = dataset.to_table(columns=["count"])["count"]
    return int(pc.sum(counts).as_py() or 0) == expected


def _read_rollup(
    settings: Settings, rollup: Rollup, query: AggregateQuery, days: Sequence[date], lo: int, hi: int
) -> pl.DataFrame:
    """Rollup rows of the query's series on `days` with bucket in [lo, hi)."""
    table = open_table(settings, rollup.name)
    if table is None:  # never chosen then: _rollup_complete said no
        return pl.DataFrame()
    dataset = table.to_pyarrow_dataset(
        partitions=[("tenant_id", "=", query.tenant_id), ("date", "in", [d.isoformat() for d in days])]
    )
    ts_type = pa.timestamp("us", tz="UTC")
    expr = row_filter(
        [query.tenant_id], list(query.device_ids), list(query.metrics) if query.metrics is not None else None
    )
    expr &= (pc.field("bucket") >= pa.scalar(_us_dt(lo), ts_type)) & (
        pc.field("bucket") < pa.scalar(_us_dt(hi), ts_type)
    )
    columns = ["device_id", "metric", "bucket", "count", "sum", "min", "max", "first", "last"]
    frame = pl.from_arrow(dataset.to_table(columns=columns, filter=expr))
    assert isinstance(frame, pl.DataFrame)
    return frame


def _rollup_for(query: AggregateQuery) -> list[Rollup]:
    if not set(query.aggs) <= ROLLUP_AGGS:
        return []
    out = []
    for rollup in (ROLLUP_1H, ROLLUP_1M):
        fine = int(rollup.width.total_seconds()) * US
        if query.width_us % fine == 0:
            out.append(rollup)
    return out


def _late_spans(late: pl.DataFrame, rollup_plan: dict[str, list[date]]) -> list[tuple[date, int, int]]:
    """(day, first ts, last ts + 1) of the late rows of each rolled-up day."""
    rolled = {d for days in rollup_plan.values() for d in days}
    spans = late.group_by((pl.col("ts") // DAY_US).alias("day")).agg(
        pl.col("ts").min().alias("lo"), pl.col("ts").max().alias("hi")
    )
    out = []
    for day_no, lo, hi in spans.sort("day").iter_rows():
        day = (EPOCH + timedelta(days=int(day_no))).date()
        if day in rolled:
            out.append((day, int(lo), int(hi) + 1))
    return out


def aggregate(
    conn: psycopg.Connection, settings: Settings, visible: Sequence[str], query: AggregateQuery
) -> AggregateResult:
    """Aggregates of the query over both tiers, each point counted once, gaps filled as asked."""
    if query.tenant_id not in visible:
        raise PermissionError(f"tenant {query.tenant_id!r} is not visible to this caller")
    if query.end_us <= query.start_us:
        raise QueryError("end must be after start")
    days = _days(query.start_us, query.end_us)
    with tenant_scope(conn, visible):
        compacted = compactions(conn, query.tenant_id, days[0], days[-1])
    hot_days = [d for d in days if d not in compacted]
    hot_spans = _spans(hot_days, query.start_us, query.end_us)
    hot_partials, late = hot_sources(conn, visible, query, compacted, hot_spans)
    result = AggregateResult(
        frame=pl.DataFrame(),
        hot_spans=[(_us_dt(a), _us_dt(b)) for a, b in hot_spans],
        late_days=late_scan_days(query, compacted),
    )
    parts = [hot_partials]

    # A rollup bucket does not say when its first and last readings were: a day with late rows
    # (which may fall inside any bucket) comes from a rollup only when neither is asked for.
    late_days = {(EPOCH + timedelta(microseconds=int(t))).date() for t in late["ts"].unique().to_list()}
    orders = bool({"first", "last"} & set(query.aggs))
    raw_days: list[date] = []
    rollup_plan: dict[str, list[date]] = {}
    candidates = _rollup_for(query)
    for day in sorted(compacted):
        if not (query.start_us < _day_us(day) + DAY_US and _day_us(day) < query.end_us):
            continue
        chosen = None
        for rollup in candidates if not (orders and day in late_days) else []:
            if _rollup_complete(settings, rollup, query.tenant_id, day, compacted[day].row_count):
                chosen = rollup
                break
        if chosen is None:
            raw_days.append(day)
        else:
            rollup_plan.setdefault(chosen.name, []).append(day)

    # Rollup days: their whole rollup buckets inside [start, end) from the rollup, the edges raw.
    edge_points: list[pl.DataFrame] = []
    for name, rdays in rollup_plan.items():
        rollup = ROLLUP_1H if name == ROLLUP_1H.name else ROLLUP_1M
        fine = int(rollup.width.total_seconds()) * US
        for lo, hi in _spans(rdays, query.start_us, query.end_us):
            a, b = -(-lo // fine) * fine, hi // fine * fine
            if a >= b:
                edge_points.append(_lake_points(settings, query, rdays, lo, hi))
                continue
            parts.append(rollup_partials(_read_rollup(settings, rollup, query, rdays, a, b), query.width_us, rollup))
            edge_points.append(_lake_points(settings, query, rdays, lo, a))
            edge_points.append(_lake_points(settings, query, rdays, b, hi))

    # Raw lake days, with the late hot rows the lake does not hold yet.
    raw = _lake_points(settings, query, raw_days, query.start_us, query.end_us) if raw_days else _points_frame([])
    if late.height:
        late = late.join(raw, on=["device_id", "metric", "ts"], how="anti")
        # Late rows of rolled-up days: dropped when the lake holds them, which only its rows in the
        # late rows' own time span can tell (usually the last minutes, not the whole day).
        held = [_lake_points(settings, query, [day], lo, hi) for day, lo, hi in _late_spans(late, rollup_plan)]
        if held:
            late = late.join(pl.concat(held), on=["device_id", "metric", "ts"], how="anti")
    result.late_rows = late.height
    points = pl.concat([raw, late, *edge_points]) if late.height or edge_points else raw
    parts.append(raw_partials(points, query.width_us))

    result.rollup_days, result.raw_lake_days = rollup_plan, raw_days
    combined = combine_partials(pl.concat([p for p in parts if p.height] or [empty_partials()]))
    result.frame = fill_gaps(finalize(combined, query.aggs), query)
    return result
