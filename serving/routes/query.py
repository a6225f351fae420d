"""Time-series query over the hot store and the lake."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel

from lake.tiered import query_points
from serving.deps import CallerDep, ConnDep, SettingsDep
from serving.problems import Problem

router = APIRouter(prefix="/api/query", tags=["query"])


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


@router.get("/telemetry", response_model=TelemetryResponse)
def query_telemetry(
    caller: CallerDep,
    conn: ConnDep,
    settings: SettingsDep,
    device_id: Annotated[list[str], Query(min_length=1, description="Device id; repeat for several")],
    start: Annotated[AwareDatetime, Query(description="Inclusive start, ISO-8601 with zone")],
    end: Annotated[AwareDatetime, Query(description="Exclusive end, ISO-8601 with zone")],
    metric: Annotated[list[str] | None, Query(description="Metric name; repeat for several; all when absent")] = None,
    tenant_id: Annotated[str | None, Query(description="A sub-tenant to read; the key's own tenant by default")] = None,
) -> TelemetryResponse:
    """Raw points of devices in a time range, from whichever tier holds each day."""
    if end <= start:
        raise Problem(422, "end must be after start")
    tenant = tenant_id or caller.tenant_id
    if tenant not in caller.visible:
        raise Problem(404, f"tenant {tenant!r} not found")
    start_utc, end_utc = start.astimezone(UTC), end.astimezone(UTC)
    result = query_points(conn, settings, caller.visible, tenant, device_id, metric, start_utc, end_utc)
    if result.points.num_rows > settings.query_max_points:
        raise Problem(
            413,
            f"the query matches {result.points.num_rows} points, more than {settings.query_max_points}; "
            "narrow the time range or ask for fewer devices or metrics",
        )
    rows = result.points.to_pylist()
    return TelemetryResponse(
        tenant_id=tenant,
        start=start_utc,
        end=end_utc,
        count=len(rows),
        lake_days=[d.isoformat() for d in result.lake_days],
        points=[Point(**{k: r[k] for k in ("device_id", "metric", "ts", "value", "quality")}) for r in rows],
    )
