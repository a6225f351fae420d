"""Time-series query over the hot store and the lake: raw points, bucketed aggregates, latest values.

Every route answers JSON (documented by the response models), CSV or an Arrow IPC stream: the
`format` parameter wins, else the Accept header (text/csv, application/vnd.apache.arrow.stream).
The planning lives in query/aggregate.py and query/points.py; this module only parses and formats.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Annotated, Literal

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
from fastapi import APIRouter, Body, Query, Request, Response, Security
from pydantic import AwareDatetime, BaseModel, Field
from starlette.concurrency import run_in_threadpool

from query.aggregate import AggregateQuery, QueryError, aggregate
from query.latest import LatestResult, LatestRow, latest
from query.points import query_points
from sensormine.clients.latest import LatestCache
from sensormine.reading import EPOCH, datetime_to_us
from sensormine.settings import Settings
from serving.deps import Caller, ConnDep, SettingsDep, authenticate
from serving.problems import Problem
from serving.query_params import check_aggs, check_fill, iso_duration, parse_bucket

router = APIRouter(prefix="/api/query", tags=["query"])
# The latest-value route alone, included before every other router: the busiest route matches first.
latest_router = APIRouter(prefix="/api/query", tags=["query"])

Reader = Annotated[Caller, Security(authenticate, scopes=["telemetry:read"])]
Format = Literal["json", "csv", "arrow"]
CSV = "text/csv"
ARROW = "application/vnd.apache.arrow.stream"
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.fZ"

DeviceParam = Annotated[list[str], Query(min_length=1, description="Device id; repeat for several")]
OptionalDevices = Annotated[
    list[str] | None, Query(description="Device id; repeat for several; all of the tenant's devices when absent")
]
MetricParam = Annotated[list[str] | None, Query(description="Metric name; repeat for several; all when absent")]
StartParam = Annotated[AwareDatetime, Query(description="Inclusive start, ISO-8601 with zone")]
EndParam = Annotated[AwareDatetime, Query(description="Exclusive end, ISO-8601 with zone")]
TenantParam = Annotated[str | None, Query(description="A sub-tenant to read; the caller's own tenant by default")]
FormatParam = Annotated[
    Format | None, Query(description="json, csv or arrow (IPC stream); else taken from the Accept header")
]


# --- models ---------------------------------------------------------------------------------------


class Point(BaseModel):
    """One raw point."""

    device_id: str
    metric: str
    ts: datetime
    value: float
    quality: int


class TelemetryResponse(BaseModel):
    """Raw points in [start, end), sorted by device, metric and time."""

    tenant_id: str
    start: datetime
    end: datetime
    count: int
    lake_days: list[str]
    points: list[Point]


class Bucket(BaseModel):
    """One bucket [ts, ts + width) of a series; only the requested aggregates are present (null when empty)."""

    ts: datetime = Field(description="Bucket start, aligned to the Unix epoch in UTC")
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    sum: float | None = None
    count: int | None = None
    first: float | None = Field(None, description="Value of the earliest point in the bucket")
    last: float | None = Field(None, description="Value of the latest point in the bucket")
    stddev: float | None = Field(None, description="Sample standard deviation (null below two points)")


class Series(BaseModel):
    """The buckets of one device and metric, in time order."""

    device_id: str
    metric: str
    buckets: list[Bucket]


class QueryPlan(BaseModel):
    """Where the answer came from."""

    rollup_days: dict[str, list[str]] = Field(description="Compacted days read from each rollup table")
    raw_lake_days: list[str] = Field(description="Compacted days read from the raw lake table")
    hot_ranges: list[list[str]] = Field(description="[start, end) ranges aggregated by the hot store")
    late_rows: int = Field(description="Late hot rows of compacted days merged in")
    late_days: list[str] = Field(
        default_factory=list, description="Compacted days the late-write log marks: their hot rows were scanned"
    )


class AggregateResponse(BaseModel):
    """Bucketed aggregates per device and metric; series without any point in range are absent."""

    tenant_id: str
    start: datetime
    end: datetime
    bucket: str = Field(description="Bucket width as an ISO-8601 duration")
    aggs: list[str]
    fill: str
    plan: QueryPlan
    series: list[Series]


class LatestPoint(BaseModel):
    """The newest point of one device and metric."""

    device_id: str
    metric: str
    ts: datetime
    value: float
    quality: int


class LatestResponse(BaseModel):
    """The newest point per device and metric that has any."""

    tenant_id: str
    count: int
    points: list[LatestPoint]


class QueryRequest(BaseModel):
    """Raw points (no bucket) or aggregates (with a bucket) of many devices and metrics in one call."""

    devices: list[str] = Field(min_length=1, description="Device ids")
    metrics: list[str] | None = Field(None, description="Metric names; all when absent")
    start: AwareDatetime = Field(description="Inclusive start, ISO-8601 with zone")
    end: AwareDatetime = Field(description="Exclusive end, ISO-8601 with zone")
    bucket: str | None = Field(None, description="Bucket width (30s, 15m, 1h, 1d, PT5M); raw points when absent")
    aggs: list[str] = Field(
        default_factory=lambda: ["avg"], description="avg, min, max, sum, count, first, last, stddev"
    )
    fill: str = Field("none", description="none, null, previous or linear")
    format: Format | None = Field(None, description="json, csv or arrow; else taken from the Accept header")
    tenant_id: str | None = Field(None, description="A sub-tenant to read; the caller's own tenant by default")


# --- formats --------------------------------------------------------------------------------------


def negotiate(request: Request, fmt: str | None) -> str:
    """The output format: the explicit parameter, else the Accept header, else JSON."""
    if fmt:
        return fmt
    accept = request.headers.get("accept", "")
    if ARROW in accept:
        return "arrow"
    if CSV in accept:
        return "csv"
    return "json"


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _tabular(frame: pl.DataFrame, fmt: str, time_columns: list[str]) -> Response:
    if fmt == "arrow":
        table = frame.to_arrow()
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return Response(sink.getvalue().to_pybytes(), media_type=ARROW)
    text = frame.with_columns(pl.col(c).dt.to_string(_TS_FORMAT) for c in time_columns).write_csv()
    return Response(text, media_type=f"{CSV}; charset=utf-8")


def _too_many(what: int, limit: int, hint: str) -> Problem:
    return Problem(413, f"the answer would hold {what} rows, more than {limit}; {hint}")


# --- raw points -----------------------------------------------------------------------------------


def _raw(
    caller: Caller,
    conn: ConnDep,
    settings: Settings,
    fmt: str,
    tenant: str,
    devices: list[str],
    metrics: list[str] | None,
    start: datetime,
    end: datetime,
) -> Response | TelemetryResponse:
    if end <= start:
        raise Problem(422, "end must be after start: swap them or widen the range")
    start_utc, end_utc = start.astimezone(UTC), end.astimezone(UTC)
    result = query_points(conn, settings, caller.visible, tenant, devices, metrics, start_utc, end_utc)
    if result.points.num_rows > settings.query_max_points:
        raise Problem(
            413,
            f"the query matches {result.points.num_rows} points, more than {settings.query_max_points}; "
            "narrow the time range, ask for fewer devices or metrics, or aggregate with a bucket",
        )
    if fmt != "json":
        frame = pl.from_arrow(result.points.select(["device_id", "metric", "ts", "value", "quality"]))
        assert isinstance(frame, pl.DataFrame)
        return _tabular(frame, fmt, ["ts"])
    rows = result.points.to_pylist()
    return TelemetryResponse(
        tenant_id=tenant,
        start=start_utc,
        end=end_utc,
        count=len(rows),
        lake_days=[d.isoformat() for d in result.lake_days],
        points=[Point(**{k: r[k] for k in ("device_id", "metric", "ts", "value", "quality")}) for r in rows],
    )


@router.get(
    "/telemetry",
    response_model=TelemetryResponse,
    responses={200: {"content": {CSV: {}, ARROW: {}}}},
)
def query_telemetry(
    request: Request,
    caller: Reader,
    conn: ConnDep,
    settings: SettingsDep,
    device_id: DeviceParam,
    start: StartParam,
    end: EndParam,
    metric: MetricParam = None,
    tenant_id: TenantParam = None,
    format: FormatParam = None,
) -> Response | TelemetryResponse:
    """Raw points of devices in a time range, from whichever tier holds each day."""
    tenant = caller.tenant(tenant_id)
    return _raw(caller, conn, settings, negotiate(request, format), tenant, device_id, metric, start, end)


# --- aggregates -----------------------------------------------------------------------------------


def _aggregate(
    caller: Caller,
    conn: ConnDep,
    settings: Settings,
    fmt: str,
    tenant: str,
    devices: list[str],
    metrics: list[str] | None,
    start: datetime,
    end: datetime,
    bucket: str,
    aggs: list[str] | None,
    fill: str | None,
) -> Response:
    try:
        query = AggregateQuery(
            tenant_id=tenant,
            device_ids=tuple(dict.fromkeys(devices)),
            metrics=tuple(dict.fromkeys(metrics)) if metrics else None,
            start=start.astimezone(UTC),
            end=end.astimezone(UTC),
            width_us=parse_bucket(bucket),
            aggs=check_aggs(aggs),
            fill=check_fill(fill),
        )
    except QueryError as exc:
        raise Problem(422, str(exc)) from None
    if query.end_us <= query.start_us:
        raise Problem(422, "end must be after start: swap them or widen the range")
    limit = settings.query_max_points
    buckets = query.bucket_count
    if buckets > limit:
        raise Problem(
            413,
            f"{buckets} buckets of {iso_duration(query.width_us)} per series, more than {limit}; "
            "use a wider bucket or a shorter time range",
        )
    if query.fill != "none" and query.metrics and buckets * len(query.device_ids) * len(query.metrics) > limit:
        raise _too_many(
            buckets * len(query.device_ids) * len(query.metrics),
            limit,
            "use a wider bucket, a shorter time range, fewer devices or metrics, or fill=none",
        )
    try:
        result = aggregate(conn, settings, caller.visible, query)
    except QueryError as exc:
        raise Problem(422, str(exc)) from None
    frame = result.frame
    if frame.height > limit:
        raise _too_many(frame.height, limit, "use a wider bucket, a shorter time range, or fewer devices or metrics")
    frame = frame.drop("_n")
    if fmt != "json":
        return _tabular(frame, fmt, ["bucket"])
    out = frame.with_columns(pl.col("bucket").dt.to_string(_TS_FORMAT).alias("ts")).select("ts", *query.aggs)
    keys = frame.select("device_id", "metric")
    series: list[dict[str, object]] = []
    if frame.height:
        # Rows are sorted by device, metric, bucket: cut them into runs of one series.
        starts = keys.with_row_index("i").filter(
            (pl.col("device_id") != pl.col("device_id").shift(1)).fill_null(True)
            | (pl.col("metric") != pl.col("metric").shift(1)).fill_null(True)
        )
        bounds = [*starts["i"].to_list(), frame.height]
        rows = out.to_dicts()
        for (i, j), dev, met in zip(pairwise(bounds), starts["device_id"], starts["metric"], strict=True):
            series.append({"device_id": dev, "metric": met, "buckets": rows[i:j]})
    return _json(
        {
            "tenant_id": tenant,
            "start": query.start.isoformat().replace("+00:00", "Z"),
            "end": query.end.isoformat().replace("+00:00", "Z"),
            "bucket": iso_duration(query.width_us),
            "aggs": list(query.aggs),
            "fill": query.fill,
            "plan": result.plan,
            "series": series,
        }
    )


@router.get(
    "/aggregate",
    response_model=AggregateResponse,
    responses={200: {"content": {CSV: {}, ARROW: {}}}, 413: {"description": "Too many buckets or rows"}},
)
def query_aggregate(
    request: Request,
    caller: Reader,
    conn: ConnDep,
    settings: SettingsDep,
    device_id: DeviceParam,
    start: StartParam,
    end: EndParam,
    bucket: Annotated[str, Query(description="Bucket width: 30s, 15m, 1h, 1d, 1w, 500ms, or ISO-8601 PT5M, P1D")],
    metric: MetricParam = None,
    agg: Annotated[
        list[str] | None, Query(description="avg, min, max, sum, count, first, last, stddev; repeat; avg by default")
    ] = None,
    fill: Annotated[
        str, Query(description="none (only buckets with data), null, previous (carry forward) or linear")
    ] = "none",
    tenant_id: TenantParam = None,
    format: FormatParam = None,
) -> Response:
    """Aggregates per device, metric and time bucket (aligned to the Unix epoch in UTC), over both tiers.

    CSV and Arrow answers are long tables: device_id, metric, bucket, then one column per aggregate.
    """
    tenant = caller.tenant(tenant_id)
    return _aggregate(
        caller, conn, settings, negotiate(request, format), tenant, device_id, metric, start, end, bucket, agg, fill
    )


@router.post(
    "",
    response_model=AggregateResponse | TelemetryResponse,
    responses={200: {"content": {CSV: {}, ARROW: {}}}},
)
def query_body(
    request: Request,
    caller: Reader,
    conn: ConnDep,
    settings: SettingsDep,
    body: Annotated[QueryRequest, Body()],
) -> Response | TelemetryResponse:
    """Many devices and metrics in one call: aggregates when `bucket` is given, raw points otherwise."""
    tenant = caller.tenant(body.tenant_id)
    fmt = negotiate(request, body.format)
    if body.bucket is None:
        if body.fill != "none" or body.aggs not in (["avg"], []):
            raise Problem(422, 'aggs and fill apply to aggregates: add a bucket (e.g. "15m") or drop them')
        return _raw(caller, conn, settings, fmt, tenant, body.devices, body.metrics, body.start, body.end)
    return _aggregate(
        caller,
        conn,
        settings,
        fmt,
        tenant,
        body.devices,
        body.metrics,
        body.start,
        body.end,
        body.bucket,
        body.aggs,
        body.fill,
    )


# --- latest ---------------------------------------------------------------------------------------


def _query_param(name: str, description: str, schema: dict[str, object]) -> dict[str, object]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_LIST: dict[str, object] = {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
_LATEST_PARAMS = [
    _query_param("device_id", "Device id; repeat for several; all of the tenant's devices when absent", _LIST),
    _query_param("metric", "Metric name; repeat for several; all when absent", _LIST),
    _query_param("tenant_id", "A sub-tenant to read; the caller's own tenant by default", {"type": "string"}),
    _query_param(
        "format",
        "json, csv or arrow (IPC stream); else taken from the Accept header",
        {"enum": ["json", "csv", "arrow"]},
    ),
]


@latest_router.get(
    "/latest",
    response_model=LatestResponse,
    responses={200: {"content": {CSV: {}, ARROW: {}}}},
    openapi_extra={"parameters": _LATEST_PARAMS},
)
async def query_latest(request: Request, caller: Reader) -> Response:
    """The newest point (ts, value, quality) of each device and metric, from the hot store or, for series
    whose hot days were dropped, from the lake.

    Named devices are answered from the process's latest-value cache, which the hot-store writers keep
    current through PostgreSQL notifications (sensormine/clients/latest.py); a device not cached yet is read
    from the database once.
    """
    # The hottest route: its query parameters are read here rather than declared to FastAPI, whose
    # per-parameter work was a quarter of the route's cost in a profile (docs/query.md); OpenAPI documents them.
    params = request.query_params
    unknown = set(params) - {"device_id", "metric", "tenant_id", "format"}
    if unknown:
        raise Problem(422, f"unknown query parameter(s) {', '.join(sorted(unknown))}; see /docs")
    device_id = params.getlist("device_id") or None
    metric = params.getlist("metric") or None
    format = params.get("format")
    if format is not None and format not in ("json", "csv", "arrow"):
        raise Problem(422, f"format must be json, csv or arrow, not {format!r}")
    tenant = caller.tenant(params.get("tenant_id"))
    cache: LatestCache | None = getattr(request.app.state, "latest_cache", None)
    rows = _cached_latest(cache, tenant, device_id, metric) if cache is not None else None
    if rows is None:
        rows = await run_in_threadpool(_latest_from_db, request, caller, tenant, device_id, metric, cache)
    fmt = negotiate(request, format)
    if fmt != "json":
        return _tabular(LatestResult(rows).frame, fmt, ["ts"])
    points = [
        {"device_id": d, "metric": m, "ts": ts, "value": v, "quality": q} for d, m, ts, v, q in rows
    ]  # orjson writes aware datetimes as RFC 3339
    return _json({"tenant_id": tenant, "count": len(points), "points": points})


def _cached_latest(
    cache: LatestCache, tenant: str, devices: list[str] | None, metrics: list[str] | None
) -> list[LatestRow] | None:
    """The answer from the cache, or None when a device is not cached (or all devices are asked for)."""
    if devices is None:
        return None
    wanted = None if metrics is None else set(metrics)
    rows: list[LatestRow] = []
    for device in sorted(set(devices)):
        series = cache.get(tenant, device)
        if series is None:
            return None
        for m in sorted(series):
            if wanted is None or m in wanted:
                ts, value, quality = series[m]
                rows.append((device, m, EPOCH + timedelta(microseconds=ts), value, quality))
    return rows


def _latest_from_db(
    request: Request,
    caller: Caller,
    tenant: str,
    devices: list[str] | None,
    metrics: list[str] | None,
    cache: LatestCache | None,
) -> list[LatestRow]:
    """The planner's answer; named devices are read whole and cached."""
    settings: Settings = request.app.state.settings
    with request.app.state.pool.connection() as conn:
        if cache is None or devices is None:
            return latest(conn, settings, caller.visible, tenant, devices, metrics).rows
        names = sorted(set(devices))
        generations = {d: cache.begin_fill(tenant, d) for d in names}
        rows = latest(conn, settings, caller.visible, tenant, names, None).rows
    by_device: dict[str, dict[str, tuple[int, float, int]]] = {d: {} for d in names}
    for d, m, ts, v, q in rows:
        by_device[d][m] = (datetime_to_us(ts), v, q)
    for d in names:
        cache.fill(tenant, d, by_device[d], generations[d])
    wanted = None if metrics is None else set(metrics)
    return [r for r in rows if wanted is None or r[1] in wanted]
