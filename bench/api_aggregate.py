"""Aggregate API benchmark: 24 h of one device in 1-minute buckets, from the rollups and from the hot store.

Run with `uv run python -m bench.api_aggregate [--points 1000000] [--repeat 50]` after
`sensormine services up` (and sourcing its env). On a scratch database and a temporary lake:
one tenant, one device, one metric, `--points` readings spread evenly over one UTC day, then
`GET /api/query/aggregate?bucket=1m&agg=avg,min,max,count` for the whole day, `--repeat` times
through FastAPI's TestClient (the whole app: auth, planner, JSON), in three states of the day:

1. hot only (not compacted yet): PostgreSQL aggregates the day's rows;
2. compacted and rolled up, hot rows still there (the normal state within the hot retention):
   the planner reads telemetry_1m and, with no late write logged for the day, skips its hot rows;
3. compacted and rolled up, hot partition dropped (after hot retention): telemetry_1m only;
4. today in steady state, on the next day: 23 hours compacted by the hourly schedule, the last hour
   written afterwards through HotStoreWriter (logged as late writes): the planner reads the day's
   rollup and adds the hot rows the compaction did not see (found by scanning the day's hot rows
   for transactions at or after the oldest late one, then dropping those the lake holds).

Prints p50 / p95 per state, what each state measured (the hot store's cold path: PostgreSQL
aggregating the raw rows; or a rollup), and the targets: p50 < 100 ms for the hot-only state (1 M
hot points: today's data is always hot, so this is what a dashboard of today costs), p50 < 50 ms in
the rolled-up states. No response cache exists on this route; PostgreSQL's buffers and the OS page
cache are warm after the first request, as on a busy server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
from fastapi.testclient import TestClient

from bench.common import checkpoint, say, scratch_database
from lake.rollups import ROLLUP_1H, ROLLUP_1M, write_rollup
from lake.telemetry import compact_day
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import INGEST, connect, ensure_partitions, partition_name
from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
from sensormine.reading import Reading
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app

TENANT, DEVICE, METRIC = "bench", "press-1", "temperature"
DAY = date(2026, 1, 15)
NEXT = DAY + timedelta(days=1)
HOT = "hot store only (PostgreSQL date_bin)"
KEPT = "rolled up, hot rows kept (no late writes)"
DROPPED = "rolled up, hot day dropped"
TODAY = "today: compacted 1 h ago, last hour hot"
# state -> (what it measured, target p50 in ms)
STATES = {
    HOT: ("cold path: raw hot rows", 100.0),
    KEPT: ("rollup telemetry_1m", 50.0),
    DROPPED: ("rollup telemetry_1m", 50.0),
    TODAY: ("rollup + late hot scan", 100.0),
}


def load_day(url: str, points: int, day: date = DAY, upto: int | None = None) -> None:
    """`points` readings of one series, evenly spaced over `day` (the first `upto` of them)."""
    step_us = 86_400_000_000 // points
    with psycopg.connect(url) as conn:
        ensure_partitions(conn, [day])
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, quality, ingest_ts) "
            "SELECT %s, %s, %s, %s::timestamptz + make_interval(secs => i * %s::bigint / 1e6), "
            "20 + 5 * sin(i / 1000.0) + random(), 0, now() FROM generate_series(0, %s - 1) i",
            (TENANT, DEVICE, METRIC, day.isoformat(), step_us, points if upto is None else upto),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE telemetry")


def write_last_hour(url: str, points: int, day: date) -> None:
    """The last hour of `day`'s `points` readings, through the hot-store writer (logged as late writes)."""
    step_us = 86_400_000_000 // points
    day_us = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1_000_000)
    first = points - points // 24
    rows = [Reading(TENANT, DEVICE, METRIC, day_us + i * step_us, 20.0 + (i % 7)) for i in range(first, points)]
    with connect(Settings(database_url=url), role=INGEST) as conn:
        HotStoreWriter(conn).write(rows)


def timings(client: TestClient, key: str, repeat: int, day: date = DAY) -> tuple[list[float], dict]:
    """Milliseconds of `repeat` identical requests for `day` (after one warm-up), and the last answer."""
    params = {
        "device_id": DEVICE,
        "metric": METRIC,
        "start": datetime(day.year, day.month, day.day, tzinfo=UTC).isoformat(),
        "end": (datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)).isoformat(),
        "bucket": "1m",
        "agg": ["avg", "min", "max", "count"],
    }
    headers = {"X-API-Key": key}
    body = client.get("/api/query/aggregate", params=params, headers=headers).json()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        resp = client.get("/api/query/aggregate", params=params, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(resp.text)
    return out, body


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load, time the three states, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.api_aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="readings in the day")
    parser.add_argument("--repeat", type=int, default=50, help="timed requests per state")
    args = parser.parse_args(argv)
    base = os.environ.get("SENSORMINE_DATABASE_URL")
    if not base:
        raise SystemExit("SENSORMINE_DATABASE_URL is not set: run `uv run sensormine services up` and source its env")
    work = Path(tempfile.mkdtemp(prefix="bench-api-aggregate-"))
    results: dict[str, list[float]] = {}
    try:
        with scratch_database(base, "bench_api_agg") as url:
            settings = Settings(database_url=url, lake_uri=str(work / "lake"), state_dir=work)
            with psycopg.connect(url) as conn:
                create_tenant(conn, TENANT, plan="enterprise")  # the free plan's rate limit would throttle the bench
                create_device(conn, TENANT, DEVICE)
                key = create_api_key(conn, TENANT, "bench")
                conn.commit()
            say(f"loading {args.points:,} readings into one device-day ...")
            load_day(url, args.points)
            checkpoint(url)
            with TestClient(create_app(settings)) as client:
                say("hot only ...")
                results[HOT], body = timings(client, key, args.repeat)
                total = sum(b["count"] for b in body["series"][0]["buckets"])
                assert total == args.points, total
                assert not body["plan"].get("rollup_days"), body["plan"]  # the raw rows, not a rollup
                say("compacting and rolling up ...")
                with psycopg.connect(url) as conn:
                    compact_day(conn, settings, TENANT, DAY)
                write_rollup(settings, ROLLUP_1M, TENANT, DAY)
                write_rollup(settings, ROLLUP_1H, TENANT, DAY)
                results[KEPT], body = timings(client, key, args.repeat)
                assert body["plan"]["rollup_days"] == {"telemetry_1m": [DAY.isoformat()]}, body["plan"]
                assert sum(b["count"] for b in body["series"][0]["buckets"]) == args.points
                with psycopg.connect(url) as conn, conn.transaction():
                    conn.execute(f"ALTER TABLE telemetry DETACH PARTITION {partition_name(DAY)}")
                    conn.execute(f"DROP TABLE {partition_name(DAY)}")
                results[DROPPED], body = timings(client, key, args.repeat)
                assert body["plan"]["rollup_days"] == {"telemetry_1m": [DAY.isoformat()]}, body["plan"]
                assert sum(b["count"] for b in body["series"][0]["buckets"]) == args.points
                say("today: 23 hours compacted, the last hour written afterwards ...")
                load_day(url, args.points, NEXT, upto=args.points - args.points // 24)
                with psycopg.connect(url) as conn:
                    compact_day(conn, settings, TENANT, NEXT)
                write_rollup(settings, ROLLUP_1M, TENANT, NEXT)
                write_last_hour(url, args.points, NEXT)
                results[TODAY], body = timings(client, key, args.repeat, NEXT)
                assert body["plan"]["late_days"] == [NEXT.isoformat()], body["plan"]
                assert body["plan"]["rollup_days"] == {"telemetry_1m": [NEXT.isoformat()]}, body["plan"]
                assert sum(b["count"] for b in body["series"][0]["buckets"]) == args.points
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"Aggregate API benchmark, {os.cpu_count()} cores: {args.points:,} readings of one device in one day, "
        f"GET /api/query/aggregate 24 h in 1-minute buckets (1440 buckets; avg, min, max, count) through "
        f"TestClient, {args.repeat} requests per state after one warm-up\n\n"
        f"{'state':<44}{'measured':<26}{'p50 ms':>9}{'p95 ms':>9}{'target p50':>12}  met\n{'-' * 105}"
    )
    for label, values in results.items():
        measured, target = STATES[label]
        p50 = statistics.median(values)
        print(
            f"{label:<44}{measured:<26}{p50:>9.1f}{pct(values, 0.95):>9.1f}{f'< {target:g} ms':>12}  "
            f"{'yes' if p50 < target else 'NO'}"
        )
    hot = statistics.median(results[HOT])
    for label in (KEPT, DROPPED, TODAY):
        print(f"speed-up of '{label}' over hot only: {hot / statistics.median(results[label]):.1f}x")
    verdict = "met" if hot < STATES[HOT][1] else "NOT met"
    print(
        f"target for 1 M hot points (today's data is always hot): p50 < {STATES[HOT][1]:g} ms: {verdict} "
        f"(p50 {hot:.0f} ms for {args.points:,} points)"
    )


if __name__ == "__main__":
    main()
