"""The query API over both tiers, checked against DuckDB computing the same answers from the raw points.

Three days: the first two compacted with rollups built, the third only in the hot store, plus
late rows for the second day written after its compaction (so it is read raw until recompacted).
"""

from __future__ import annotations

import io
import math
import random
from datetime import UTC, date, datetime, timedelta

import duckdb
import httpx
import psycopg
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc
import pytest
from fastapi.testclient import TestClient

from lake.rollups import ROLLUP_1H, ROLLUP_1M, write_rollup
from lake.telemetry import compact_day
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import partition_name
from sensormine.reading import Reading, datetime_to_us
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant

pytestmark = pytest.mark.integration

D1, D2, D3 = date(2026, 11, 24), date(2026, 11, 25), date(2026, 11, 26)
START = datetime(2026, 11, 24, 0, 17, tzinfo=UTC)  # not aligned to any rollup bucket
END = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
METRICS = ("pressure", "temperature")
AGGS = ("avg", "min", "max", "sum", "count", "first", "last", "stddev")


def day_us(d: date) -> int:
    return datetime_to_us(datetime(d.year, d.month, d.day, tzinfo=UTC))


def series_points(rng: random.Random, device: str, d: date, n: int) -> list[Reading]:
    out = []
    for metric in METRICS:
        for ts in sorted(rng.sample(range(0, 86_400_000_000, 1_000), n)):
            out.append(Reading("acme", device, metric, day_us(d) + ts, round(rng.uniform(-20, 80), 3), 0, 0))
    return out


@pytest.fixture
def world(settings: Settings, conn: psycopg.Connection) -> tuple[str, list[Reading]]:
    """acme's key and every point written, compacted and rolled up as described above."""
    key = make_tenant(conn, "acme", ["d1", "d2", "sparse"])
    rng = random.Random(7)
    points: list[Reading] = []
    for d in (D1, D2, D3):
        points += series_points(rng, "d1", d, 400) + series_points(rng, "d2", d, 150)
    # A sparse series: gaps at every width, for gap filling.
    for i, hours in enumerate((1.2, 3.5, 4.1, 9.9, 20.0, 30.5, 40.0, 47.3)):
        points.append(Reading("acme", "sparse", "level", day_us(D1) + int(hours * 3600e6), float(i * i), 0, 0))
    writer = HotStoreWriter(conn)
    writer.write([Reading(r.tenant_id, r.device_id, r.metric, r.ts, r.value, r.quality, r.ts) for r in points])
    conn.commit()
    for d in (D1, D2):
        compact_day(conn, settings, "acme", d)
        write_rollup(settings, ROLLUP_1M, "acme", d)
        write_rollup(settings, ROLLUP_1H, "acme", d)
    late = [
        *series_points(random.Random(8), "d1", D2, 20),
        Reading("acme", "sparse", "level", day_us(D2) + int(1.5 * 3600e6), 99.0, 0, 0),
    ]
    existing = {(r.device_id, r.metric, r.ts) for r in points}
    late = [r for r in late if (r.device_id, r.metric, r.ts) not in existing]
    HotStoreWriter(conn).write(late)
    conn.commit()
    return key, points + late


def reference(points: list[Reading], width_us: int, start: datetime, end: datetime) -> dict[tuple, dict]:
    """Aggregates per (device, metric, bucket start µs) computed by DuckDB from the raw points."""
    lo, hi = datetime_to_us(start), datetime_to_us(end)
    table = pa.table(
        {
            "device_id": [r.device_id for r in points],
            "metric": [r.metric for r in points],
            "ts": [r.ts for r in points],
            "value": [r.value for r in points],
        }
    )
    con = duckdb.connect()
    con.register("p", table)
    rows = con.sql(
        f"""SELECT device_id, metric, (ts // {width_us}) * {width_us} AS b, avg(value), min(value), max(value),
                   sum(value), count(*), arg_min(value, ts), arg_max(value, ts), stddev_samp(value)
            FROM p WHERE ts >= {lo} AND ts < {hi} GROUP BY ALL"""
    ).fetchall()
    return {(r[0], r[1], r[2]): dict(zip(AGGS, r[3:], strict=True)) for r in rows}


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
        return a is None and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def flatten(body: dict) -> dict[tuple, dict]:
    out = {}
    for s in body["series"]:
        for b in s["buckets"]:
            ts = datetime_to_us(datetime.fromisoformat(b["ts"].replace("Z", "+00:00")))
            out[(s["device_id"], s["metric"], ts)] = b
    return out


def agg_params(bucket: str, **extra: object) -> dict[str, object]:
    return {
        "device_id": ["d1", "d2", "sparse"],
        "start": START.isoformat(),
        "end": END.isoformat(),
        "bucket": bucket,
        "agg": list(AGGS),
        **extra,
    }


@pytest.mark.parametrize(
    ("bucket", "width_us", "rollup"),
    [
        ("1h", 3_600_000_000, "telemetry_1h"),
        ("15m", 900_000_000, "telemetry_1m"),
        ("7m", 420_000_000, "telemetry_1m"),  # any multiple of a minute combines 1-minute rollups
        ("90s", 90_000_000, None),
        ("1d", 86_400_000_000, "telemetry_1h"),
    ],
)
def test_every_aggregate_across_tiers_matches_duckdb(
    settings: Settings, world: tuple[str, list[Reading]], bucket: str, width_us: int, rollup: str | None
) -> None:
    key, points = world
    want = reference(points, width_us, START, END)
    with TestClient(create_app(settings)) as client:
        # stddev is never derived from rollups: with it, every compacted day is read raw.
        for aggs, plan_rollups in ((AGGS[:-1], {rollup: [D1.isoformat()]} if rollup else {}), (AGGS, {})):
            params = agg_params(bucket, agg=list(aggs))
            resp = client.get("/api/query/aggregate", params=params, headers={"X-API-Key": key})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            plan = body["plan"]
            # Day 1 from a rollup when possible; day 2 has late rows, so raw; day 3 from the hot store.
            assert plan["rollup_days"] == plan_rollups
            assert D2.isoformat() in plan["raw_lake_days"]
            assert plan["late_rows"] == 41
            assert plan["hot_ranges"] == [["2026-11-26T00:00:00+00:00", END.isoformat()]]
            got = flatten(body)
            assert got.keys() == want.keys()
            for k, expected in want.items():
                for agg in aggs:
                    assert close(got[k][agg], expected[agg]), (k, agg, got[k][agg], expected[agg])


def test_csv_and_arrow_match_json(settings: Settings, world: tuple[str, list[Reading]]) -> None:
    key, _ = world
    with TestClient(create_app(settings)) as client:
        params = agg_params("1h", agg=["avg", "count", "last"])
        headers = {"X-API-Key": key}
        as_json = flatten(client.get("/api/query/aggregate", params=params, headers=headers).json())
        csv_resp = client.get("/api/query/aggregate", params=params, headers={**headers, "Accept": "text/csv"})
        assert csv_resp.headers["content-type"].startswith("text/csv")
        arrow_resp = client.get("/api/query/aggregate", params={**params, "format": "arrow"}, headers=headers)
        assert arrow_resp.headers["content-type"] == "application/vnd.apache.arrow.stream"
    csv_table = pcsv.read_csv(io.BytesIO(csv_resp.content))
    arrow_table = ipc.open_stream(arrow_resp.content).read_all()
    assert (
        csv_table.column_names == arrow_table.column_names == ["device_id", "metric", "bucket", "avg", "count", "last"]
    )
    for table in (csv_table, arrow_table):
        assert table.num_rows == len(as_json)
        for row in table.to_pylist():
            b = as_json[(row["device_id"], row["metric"], datetime_to_us(row["bucket"]))]
            assert close(row["avg"], b["avg"]) and row["count"] == b["count"] and close(row["last"], b["last"])


def expected_fill(points: list[Reading], width_us: int, start: datetime, end: datetime, mode: str) -> list:
    """(bucket µs, avg, count) of the sparse series for one fill mode, computed in plain Python."""
    ref = reference([p for p in points if p.device_id == "sparse"], width_us, start, end)
    have = {k[2]: v for k, v in ref.items()}
    first = datetime_to_us(start) // width_us * width_us
    grid = list(range(first, datetime_to_us(end), width_us))
    out = []
    known = [b for b in grid if b in have]
    for b in grid:
        if b in have:
            out.append((b, have[b]["avg"], have[b]["count"]))
        elif mode == "null":
            out.append((b, None, 0))
        elif mode == "previous":
            before = [x for x in known if x < b]
            out.append((b, have[before[-1]]["avg"] if before else None, 0))
        else:
            before, after = [x for x in known if x < b], [x for x in known if x > b]
            if not before or not after:
                out.append((b, None, 0))
            else:
                x0, x1 = before[-1], after[0]
                y0, y1 = have[x0]["avg"], have[x1]["avg"]
                out.append((b, y0 + (y1 - y0) * (b - x0) / (x1 - x0), 0))
    return out


@pytest.mark.parametrize("mode", ["none", "null", "previous", "linear"])
def test_gap_filling(settings: Settings, world: tuple[str, list[Reading]], mode: str) -> None:
    key, points = world
    with TestClient(create_app(settings)) as client:
        params = {**agg_params("2h", agg=["avg", "count"], fill=mode), "device_id": ["sparse"]}
        body = client.get("/api/query/aggregate", params=params, headers={"X-API-Key": key}).json()
    got = [(k[2], v["avg"], v["count"]) for k, v in sorted(flatten(body).items())]
    want = expected_fill(points, 7_200_000_000, START, END, "null" if mode == "none" else mode)
    if mode == "none":
        want = [w for w in want if w[2]]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0] and g[2] == w[2] and close(g[1], w[1]), (g, w)


def test_post_query_raw_and_aggregate(settings: Settings, world: tuple[str, list[Reading]]) -> None:
    key, points = world
    body = {
        "devices": ["d1", "d2"],
        "metrics": ["temperature"],
        "start": "2026-11-25T23:00:00Z",
        "end": "2026-11-26T01:00:00Z",
    }
    lo, hi = (
        datetime_to_us(datetime(2026, 11, 25, 23, tzinfo=UTC)),
        datetime_to_us(datetime(2026, 11, 26, 1, tzinfo=UTC)),
    )
    wanted = sorted(
        (p.device_id, p.ts)
        for p in points
        if p.device_id in ("d1", "d2") and p.metric == "temperature" and lo <= p.ts < hi
    )
    with TestClient(create_app(settings)) as client:
        raw = client.post("/api/query", json=body, headers={"X-API-Key": key})
        assert raw.status_code == 200, raw.text
        got = sorted((p["device_id"], datetime_to_us(datetime.fromisoformat(p["ts"]))) for p in raw.json()["points"])
        assert got == wanted
        raw_csv = client.post("/api/query", json={**body, "format": "csv"}, headers={"X-API-Key": key})
        assert pcsv.read_csv(io.BytesIO(raw_csv.content)).num_rows == len(wanted)
        agg = client.post("/api/query", json={**body, "bucket": "PT30M", "aggs": ["count"]}, headers={"X-API-Key": key})
        assert agg.status_code == 200, agg.text
        assert agg.json()["bucket"] == "PT30M"
        assert sum(b["count"] for s in agg.json()["series"] for b in s["buckets"]) == len(wanted)


def test_latest_from_hot_store_and_lake(
    settings: Settings, conn: psycopg.Connection, world: tuple[str, list[Reading]]
) -> None:
    key, points = world
    newest: dict[tuple[str, str], Reading] = {}
    for p in points:
        if (p.device_id, p.metric) not in newest or p.ts > newest[(p.device_id, p.metric)].ts:
            newest[(p.device_id, p.metric)] = p
    with TestClient(create_app(settings)) as client:
        h = {"X-API-Key": key}
        every = client.get("/api/query/latest", headers=h).json()
        assert every["count"] == len(newest)
        for p in every["points"]:
            want = newest[(p["device_id"], p["metric"])]
            assert datetime_to_us(datetime.fromisoformat(p["ts"])) == want.ts and p["value"] == want.value
        some = client.get("/api/query/latest", params={"device_id": ["d1", "nope"], "metric": "pressure"}, headers=h)
        assert [(p["device_id"], p["metric"]) for p in some.json()["points"]] == [("d1", "pressure")]
        # Day 2 recompacted (its late rows reach the lake), then hot days 1 and 2 dropped as retention
        # would: "sparse" now lives only in the lake.
        compact_day(conn, settings, "acme", D2)
        with conn.transaction():
            for d in (D1, D2):
                conn.execute(f"ALTER TABLE telemetry DETACH PARTITION {partition_name(d)}")
                conn.execute(f"DROP TABLE {partition_name(d)}")
        lake_only = client.get("/api/query/latest", params={"device_id": "sparse"}, headers=h).json()
        sparse = newest[("sparse", "level")]
        assert sparse.ts < day_us(D3)
        assert [(p["metric"], p["value"]) for p in lake_only["points"]] == [("level", sparse.value)]
        assert datetime_to_us(datetime.fromisoformat(lake_only["points"][0]["ts"])) == sparse.ts
        csv_resp = client.get("/api/query/latest", params={"format": "csv"}, headers=h)
        assert pcsv.read_csv(io.BytesIO(csv_resp.content)).num_rows == len(newest)


def assert_problem(resp: httpx.Response, status: int, fragment: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert fragment in resp.json()["detail"], resp.json()


def test_errors_are_problem_json(settings: Settings, world: tuple[str, list[Reading]]) -> None:
    key, _ = world
    small = settings.model_copy(update={"query_max_points": 100})
    with TestClient(create_app(small)) as client:
        h = {"X-API-Key": key}

        def get(**params: object) -> httpx.Response:
            return client.get("/api/query/aggregate", params={**agg_params("1h"), **params}, headers=h)

        assert_problem(get(bucket="1mo"), 422, "ISO-8601")
        assert_problem(get(bucket="0s"), 422, "positive")
        assert_problem(get(agg="median"), 422, "choose from")
        assert_problem(get(fill="spline"), 422, "choose from")
        assert_problem(get(start=END.isoformat(), end=START.isoformat()), 422, "end must be after start")
        assert_problem(get(bucket="1m"), 413, "wider bucket")
        assert_problem(get(), 413, "fewer devices")  # 3 devices x 61 buckets: more than 100 rows
        assert_problem(get(tenant_id="globex"), 404, "not found")
        assert_problem(client.get("/api/query/aggregate", params=agg_params("1h")), 401, "API key")
        post = client.post("/api/query", json={"devices": ["d1"], "start": "x"}, headers=h)
        assert_problem(post, 422, "invalid")
        post = client.post(
            "/api/query",
            json={"devices": ["d1"], "start": START.isoformat(), "end": END.isoformat(), "fill": "linear"},
            headers=h,
        )
        assert_problem(post, 422, "add a bucket")
        spec = client.get("/openapi.json").json()
        assert {"/api/query/aggregate", "/api/query/latest", "/api/query"} <= set(spec["paths"])
        assert "AggregateResponse" in spec["components"]["schemas"]


def test_hot_only_day_matches_duckdb(settings: Settings, conn: psycopg.Connection) -> None:
    key = make_tenant(conn, "acme", ["d1"])
    points = series_points(random.Random(3), "d1", D3, 300)
    HotStoreWriter(conn).write(points)
    conn.commit()
    start, end = datetime(2026, 11, 26, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC) + timedelta(days=1)
    with TestClient(create_app(settings)) as client:
        params = {"device_id": "d1", "start": start.isoformat(), "end": end.isoformat(), "bucket": "1m", "agg": AGGS}
        body = client.get("/api/query/aggregate", params=params, headers={"X-API-Key": key}).json()
    got, want = flatten(body), reference(points, 60_000_000, start, end)
    assert got.keys() == want.keys()
    for k, expected in want.items():
        for agg in AGGS:
            assert close(got[k][agg], expected[agg]), (k, agg)
