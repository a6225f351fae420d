"""The aggregate query planner over both tiers, gap filling, and the latest value per series.

One request (tenant, devices, metrics, [start, end), bucket width, aggregates, fill) is answered
from partial aggregates that are combined per (device, metric, bucket):

- compacted tenant-days come from the lake: from the rollup tables `telemetry_1h` / `telemetry_1m`
  when the width is a multiple of the rollup's, every requested aggregate combines from rollup
  partials (not stddev), the rollup partition is complete (its readings add up to the day's
  `lake_compactions.row_count`) and the day has no late hot rows; from the raw lake table otherwise
  (and for the unaligned edges of the range);
- days the lake does not hold are aggregated by PostgreSQL (date_bin on the Unix epoch);
- late rows of compacted days (written by a transaction not visible in the compaction's hot
  snapshot) are read raw, and those the lake already holds are dropped, so a point (tenant, device,
  metric, ts) counts once; only days the late-write log `hot_write_log` marks are scanned for them
  (sensormine.hotquery, docs/query.md "Late rows").

Buckets are aligned to the Unix epoch in UTC. No FastAPI here: serving/routes/query.py wraps it.
"""

from __future__ import annotations

import math
import re
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
from lake.telemetry import read_telemetry, row_filter, telemetry_dataset
from sensormine.db import tenant_scope
from sensormine.hotquery import CompactedDay, compacted_days, late_condition
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

_UNITS_US = {"ms": 1_000, "s": US, "m": 60 * US, "min": 60 * US, "h": 3_600 * US, "d": DAY_US, "w": 7 * DAY_US}
_SHORT = re.compile(r"^\s*(\d+)\s*(ms|s|min|m|h|d|w)\s*$", re.IGNORECASE)
_ISO = re.compile(
    r"^P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d{1,6})?)S)?)?$",
    re.IGNORECASE,
)

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


# --- parsing --------------------------------------------------------------------------------------


def parse_bucket(text: str) -> int:
    """A bucket width in microseconds from `30s`, `15m`, `1h`, `1d`, `2w`, `500ms` or ISO-8601 `PT5M`, `P1D`."""
    width = 0
    short = _SHORT.match(text)
    iso = None if short else _ISO.match(text.strip())
    if short:
        width = int(short[1]) * _UNITS_US[short[2].lower()]
    elif iso and any(iso.groupdict().values()):
        parts = {k: v or "0" for k, v in iso.groupdict().items()}
        seconds_us = round(float(parts["s"]) * US)
        width = (
            int(parts["w"]) * 7 * DAY_US
            + int(parts["d"]) * DAY_US
            + int(parts["h"]) * 3_600 * US
            + int(parts["m"]) * 60 * US
            + seconds_us
        )
    else:
        raise QueryError(
            f"bucket {text!r} is not a duration: use a number and a unit (500ms, 30s, 15m, 1h, 1d, 1w) "
            "or an ISO-8601 duration such as PT5M or P1D (months and years have no fixed width)"
        )
    if width <= 0 or width % 1_000:
        raise QueryError(f"bucket {text!r} must be a positive whole number of milliseconds")
    return width


def iso_duration(width_us: int) -> str:
    """ISO-8601 text of a width: PT1M, PT1H30M, P1D, PT0.5S."""
    days, rest = divmod(width_us, DAY_US)
    hours, rest = divmod(rest, 3_600 * US)
    minutes, rest = divmod(rest, 60 * US)
    seconds = rest / US
    out = "P" + (f"{days}D" if days else "")
    time_part = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if rest:
        time_part += f"{int(seconds)}S" if rest % US == 0 else f"{seconds:g}S"
    return out + ("T" + time_part if time_part else "") if (days or time_part) else "PT0S"


def check_aggs(aggs: Sequence[str] | None) -> tuple[str, ...]:
    """The requested aggregates in request order, without repeats (avg when none)."""
    out = tuple(dict.fromkeys(a.strip().lower() for a in (aggs or ["avg"]) for a in a.split(",") if a.strip()))
    unknown = [a for a in out if a not in AGGS]
    if unknown:
        raise QueryError(f"unknown aggregate {', '.join(unknown)}: choose from {', '.join(AGGS)}")
    return out or ("avg",)


def check_fill(fill: str | None) -> str:
    """The gap-filling mode (none when absent)."""
    mode = (fill or "none").strip().lower()
    if mode not in FILLS:
        raise QueryError(f"unknown fill {fill!r}: choose from {', '.join(FILLS)}")
    return mode


# --- the request ----------------------------------------------------------------------------------


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


# --- partial aggregates ---------------------------------------------------------------------------


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
    ever combined with them (the planner reads a day with late rows raw), so they order correctly.
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


# --- sources --------------------------------------------------------------------------------------


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
    return (
        "SELECT device_id, metric, "
        "(extract(epoch FROM date_bin(%(width)s, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00')) * 1000000)::bigint AS b, "
        f"count(*), sum(value), min(value), max(value), {m2}, {first}, {last} "
        "FROM telemetry WHERE tenant_id = %(tenant)s AND device_id = ANY(%(devices)s)"
        f"{metric} AND ({ranges}) GROUP BY 1, 2, 3"
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


def aggregate(
    conn: psycopg.Connection, settings: Settings, visible: Sequence[str], query: AggregateQuery
) -> AggregateResult:
    """Aggregates of the query over both tiers, each point counted once, gaps filled as asked."""
    if query.tenant_id not in visible:
        raise PermissionError(f"tenant {query.tenant_id!r} is not visible to this caller")
    if query.end_us <= query.start_us:
        raise QueryError("end must be after start")
    days = _days(query.start_us, query.end_us)
    compacted = compactions(conn, query.tenant_id, days[0], days[-1])
    conn.commit()
    hot_days = [d for d in days if d not in compacted]
    hot_spans = _spans(hot_days, query.start_us, query.end_us)
    hot_partials, late = hot_sources(conn, visible, query, compacted, hot_spans)
    result = AggregateResult(
        frame=pl.DataFrame(),
        hot_spans=[(_us_dt(a), _us_dt(b)) for a, b in hot_spans],
        late_days=late_scan_days(query, compacted),
    )
    parts = [hot_partials]

    late_days = {(EPOCH + timedelta(microseconds=int(t))).date() for t in late["ts"].unique().to_list()}
    raw_days: list[date] = []
    rollup_plan: dict[str, list[date]] = {}
    candidates = _rollup_for(query)
    for day in sorted(compacted):
        if not (query.start_us < _day_us(day) + DAY_US and _day_us(day) < query.end_us):
            continue
        chosen = None
        if day not in late_days:
            for rollup in candidates:
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
    result.late_rows = late.height
    points = pl.concat([raw, late, *edge_points]) if late.height or edge_points else raw
    parts.append(raw_partials(points, query.width_us))

    result.rollup_days, result.raw_lake_days = rollup_plan, raw_days
    combined = combine_partials(pl.concat([p for p in parts if p.height] or [empty_partials()]))
    result.frame = fill_gaps(finalize(combined, query.aggs), query)
    return result


# --- latest value per series ----------------------------------------------------------------------

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
