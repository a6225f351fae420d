"""Latest-value API benchmark: GET /api/query/latest on one uvicorn worker, against a bare FastAPI route.

Run with `uv run python -m bench.api_latest [--seconds 10] [--connections 4]` after `sensormine services
up` (and sourcing its env). On a scratch database: one tenant with `--devices` devices x `--metrics`
metrics, one reading every 10 s for two days (today and yesterday, ~35 k rows per series-day),
and an API key. Then, one after the other, each server runs as ONE uvicorn worker (httptools,
uvloop, no access log) in its own process:

- real: `serving.main:create_app` on the scratch database (auth with the credential cache,
  the planner's pipelined skip-scan query, JSON);
- bare: a FastAPI app with one `async def` route returning a constant JSON object.

The real app runs in four configurations, so that the figure says what it measured:

- cache on, no writes: every answer comes from the in-memory latest-value cache (`LatestCache`,
  filled once per device, then kept current by notifications), the best case;
- cache on, writers running: `--writers` processes write a new point of every series every
  `--write-interval-ms` through `HotStoreWriter.write` (the hot-store write path, whose commit
  notifies the API processes), so the cache folds notifications in while it serves;
- cache off (`SENSORMINE_LATEST_PUSH=false`), no writes, and with writers: the cold path, the
  planner's query against PostgreSQL on every request.

After each run with writers, the answers for every device are checked against the newest rows in
PostgreSQL (the cache must not serve stale points once the writes have committed).

A load generator in a third process keeps `--connections` HTTP/1.1 keep-alive connections busy
(asyncio over raw sockets, one request in flight per connection) for `--seconds` after a warm-up,
asking the real server for one device's latest values (every metric; the device rotates) and the
bare one for its constant. `--rounds` repeats the whole sequence (interleaved) and reports medians.
Prints requests/s, p50 and p99 for each, and the ratio to the bare route (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from fastapi import FastAPI

from bench.common import checkpoint, say, scratch_database
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import ensure_partitions
from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
from sensormine.reading import Reading, now_us
from sensormine.tenancy.tenants import create_tenant

TENANT = "bench"


# --- the two apps (uvicorn factories) -------------------------------------------------------------


def real_app() -> FastAPI:
    """The real API on the environment's settings (the bench points SENSORMINE_DATABASE_URL at its database)."""
    from serving.main import create_app

    return create_app()


def bare_app() -> FastAPI:
    """FastAPI with one async route returning a constant: the ceiling for one worker."""
    app = FastAPI()

    @app.get("/constant")
    async def constant() -> dict[str, str]:
        return {"status": "ok"}

    return app


# --- load generator -------------------------------------------------------------------------------


async def _connection(
    host: str, port: int, requests: list[bytes], stop_at: float, warm_until: float, lat: list[float]
) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    done, i = 0, 0
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                return done
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()} from {host}:{port}: {body[:300].decode(errors='replace')}")
            end = time.perf_counter()
            if now >= warm_until:
                lat.append(end - now)
                done += 1
    finally:
        writer.close()


async def _drive(host: str, port: int, paths: list[str], headers: dict[str, str], seconds: float, conns: int) -> dict:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode() for p in paths]
    warm = 1.0
    start = time.perf_counter()
    lat: list[float] = []
    counts = await asyncio.gather(
        *(
            _connection(host, port, requests[i:] + requests[:i], start + warm + seconds, start + warm, lat)
            for i in range(conns)
        )
    )
    lat.sort()
    return {
        "requests": sum(counts),
        "rps": sum(counts) / seconds,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
    }


def drive_main(argv: list[str]) -> None:
    """Load generator process: `--drive PORT SECONDS CONNS JSON(paths, headers)`; prints a JSON result."""
    port, seconds, conns, spec = int(argv[0]), float(argv[1]), int(argv[2]), json.loads(argv[3])
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a uvicorn[standard] dependency
        pass
    print(json.dumps(asyncio.run(_drive("127.0.0.1", port, spec["paths"], spec["headers"], seconds, conns))))


# --- writers -------------------------------------------------------------------------------------


def write_main(argv: list[str]) -> None:
    """Writer process: `--write URL SECONDS INTERVAL_MS DEVICE_FROM DEVICE_TO METRICS`.

    Every interval, one transaction through `HotStoreWriter.write` with a new point of every series
    of its devices (its commit notifies the API processes); prints the number of writes at the end.
    """
    url, seconds, interval = argv[0], float(argv[1]), float(argv[2]) / 1000
    first, last, metrics = int(argv[3]), int(argv[4]), int(argv[5])
    series = [(f"dev-{d:03d}", f"metric_{m}") for d in range(first, last) for m in range(1, metrics + 1)]
    writes = 0
    with psycopg.connect(url) as conn:
        writer = HotStoreWriter(conn)
        stop_at = time.monotonic() + seconds
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            ts = now_us()
            writer.write([Reading(TENANT, d, m, ts, float(writes % 1000), 0, ts) for d, m in series])
            writes += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    print(json.dumps({"writes": writes, "series": len(series)}))


def start_writers(url: str, args: argparse.Namespace) -> list[subprocess.Popen[str]]:
    """`args.writers` writer processes, the devices split between them, running a little longer than the load."""
    seconds = args.seconds + 3  # the load generator's warm-up and start-up, then its timed window
    per = -(-args.devices // args.writers)
    procs = []
    for w in range(args.writers):
        first, last = w * per, min(args.devices, (w + 1) * per)
        if first >= last:
            continue
        cmd = [sys.executable, "-m", "bench.api_latest", "--write", url, str(seconds), str(args.write_interval_ms)]
        procs.append(
            subprocess.Popen([*cmd, str(first), str(last), str(args.metrics)], stdout=subprocess.PIPE, text=True)
        )
    return procs


def stop_writers(procs: list[subprocess.Popen[str]]) -> int:
    """Wait for the writers to finish; returns the transactions they wrote."""
    writes = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode:
            raise RuntimeError(f"a writer failed with {proc.returncode}")
        writes += json.loads(out.strip().splitlines()[-1])["writes"]
    return writes


def check_fresh(port: int, url: str, headers: dict[str, str], devices: int) -> int:
    """Series whose served latest point is older than the newest row in PostgreSQL (0 when all are fresh)."""
    import httpx

    with psycopg.connect(url) as conn:
        newest = {
            (d, m): ts
            for d, m, ts in conn.execute(
                "SELECT device_id, metric, max(ts) FROM telemetry WHERE tenant_id = %s GROUP BY 1, 2", (TENANT,)
            ).fetchall()
        }
    stale = 0
    for i in range(devices):
        device = f"dev-{i:03d}"
        body = httpx.get(f"http://127.0.0.1:{port}/api/query/latest?device_id={device}", headers=headers).json()
        for point in body["points"]:
            served = datetime.fromisoformat(point["ts"].replace("Z", "+00:00"))
            if served < newest[(device, point["metric"])]:
                stale += 1
    return stale


# --- orchestration --------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback port."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, headers: dict[str, str], timeout: float = 60.0) -> None:
    """Until the server answers `path` with 200."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server on port {port} did not answer {path} within {timeout} s")


def run_server(
    factory: str,
    env: dict[str, str],
    path: str,
    headers: dict[str, str],
    args: argparse.Namespace,
    writers_url: str | None = None,
) -> dict:
    """Start one uvicorn worker with `factory`, drive it from another process, stop it; the figures.

    With `writers_url`, writer processes update every series during the load, and afterwards every
    device's answer is checked against PostgreSQL (`stale`: series served older than stored).
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
        "--http",
        "httptools",
        "--loop",
        "uvloop",
    ]
    server = subprocess.Popen(cmd, env=env)
    try:
        wait_http(port, path.format(i=0), headers)
        paths = [path.format(i=i) for i in range(args.devices)]
        spec = json.dumps({"paths": paths, "headers": headers})
        drive = [sys.executable, "-m", "bench.api_latest", "--drive", str(port), str(args.seconds)]
        drive.append(str(args.connections))
        writers = start_writers(writers_url, args) if writers_url else []
        try:
            out = subprocess.run(
                [*drive, spec],
                env=env,
                capture_output=True,
                text=True,
            )
        finally:
            writes = stop_writers(writers)
        if out.returncode:
            raise RuntimeError(f"the load generator failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if writers_url:
            time.sleep(0.5)  # notifications of the last commits on their way to the server
            result["writes"] = writes
            result["stale"] = check_fresh(port, writers_url, headers, args.devices)
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def load(url: str, devices: int, metrics: int) -> str:
    """Tenant, devices, two days of readings every 10 s; returns an API key."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with psycopg.connect(url) as conn:
        create_tenant(conn, TENANT, plan="enterprise")  # its rate limit (1,000/s) is above what one worker serves
        for d in range(devices):
            create_device(conn, TENANT, f"dev-{d:03d}")
        key = create_api_key(conn, TENANT, "bench")
        ensure_partitions(conn, [(today + timedelta(days=i)).date() for i in range(-1, 2)])
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, quality, ingest_ts) "
            "SELECT %s, 'dev-' || lpad(d::text, 3, '0'), 'metric_' || m, ts, random() * 100, 0, ts "
            "FROM generate_series(0, %s - 1) d, generate_series(1, %s) m, "
            "     generate_series(%s::timestamptz, now(), interval '10 seconds') ts",
            (TENANT, devices, metrics, today - timedelta(days=1)),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE telemetry")
    return key


# label -> (what it measured, SENSORMINE_LATEST_PUSH, writers running)
CONFIGS = {
    "latest, cache on, no writes": ("in-memory cache", "true", False),
    "latest, cache on, writers running": ("cache + notifications", "true", True),
    "latest, cache off, no writes": ("cold path: PostgreSQL", "false", False),
    "latest, cache off, writers running": ("cold path: PostgreSQL", "false", True),
}
BARE = "bare FastAPI async constant"


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load, run the servers (interleaved, `--rounds` times), print the figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--drive":
        drive_main(argv[1:])
        return
    if argv and argv[0] == "--write":
        write_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.api_latest", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed load per server (after 1 s warm-up)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent keep-alive connections")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--metrics", type=int, default=5)
    parser.add_argument("--writers", type=int, default=2, help="writer processes in the runs with writes")
    parser.add_argument(
        "--write-interval-ms", type=float, default=100, help="each writer: one transaction (every series) per interval"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat every configuration; medians are printed")
    args = parser.parse_args(argv)
    base = os.environ.get("SENSORMINE_DATABASE_URL")
    if not base:
        raise SystemExit("SENSORMINE_DATABASE_URL is not set: run `uv run sensormine services up` and source its env")
    work = Path(tempfile.mkdtemp(prefix="bench-api-latest-"))
    runs: dict[str, list[dict]] = {label: [] for label in (*CONFIGS, BARE)}
    try:
        with scratch_database(base, "bench_api_latest") as url:
            say(f"loading {args.devices} devices x {args.metrics} metrics, every 10 s since yesterday ...")
            key = load(url, args.devices, args.metrics)
            checkpoint(url)
            env = {
                **os.environ,
                "SENSORMINE_DATABASE_URL": url,
                "SENSORMINE_LAKE_URI": str(work / "lake"),
                "SENSORMINE_STATE_DIR": str(work),
                "SENSORMINE_ENV": "dev",
            }
            path = "/api/query/latest?device_id=dev-{i:03d}"
            for r in range(args.rounds):
                for label, (_, push, writes) in CONFIGS.items():
                    say(f"round {r + 1}/{args.rounds}: {label} ...")
                    cfg_env = {**env, "SENSORMINE_LATEST_PUSH": push}
                    got = run_server(
                        "bench.api_latest:real_app", cfg_env, path, {"X-API-Key": key}, args, url if writes else None
                    )
                    runs[label].append(got)
                    say(f"  {got['rps']:,.0f} requests/s" + (f", {got['stale']} stale series" if writes else ""))
                say(f"round {r + 1}/{args.rounds}: bare route ...")
                runs[BARE].append(run_server("bench.api_latest:bare_app", env, "/constant", {}, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(label: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[label])

    bare_rps = med(BARE, "rps")
    writes_per_s = args.writers * 1000 / args.write_interval_ms
    print(
        f"Latest-value API benchmark, {os.cpu_count()} cores: one uvicorn worker each, {args.connections} keep-alive "
        f"connections from a separate load-generator process, {args.seconds:g} s after a 1 s warm-up; "
        f"{args.devices} devices x {args.metrics} metrics, latest of one device (all metrics) per request; "
        f"writers: {args.writers} processes, {writes_per_s:g} transactions/s in all, each a new point of its "
        f"devices' series; median of {args.rounds} interleaved round(s)\n\n"
        f"{'server':<38}{'measured':<24}{'requests/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}{'stale':>7}"
        f"\n{'-' * 106}"
    )
    for label in (*CONFIGS, BARE):
        measured = CONFIGS[label][0] if label in CONFIGS else "constant, no I/O"
        stale = f"{max(r['stale'] for r in runs[label])}" if label in CONFIGS and CONFIGS[label][2] else ""
        rps = med(label, "rps")
        print(
            f"{label:<38}{measured:<24}{rps:>12,.0f}{med(label, 'p50_ms'):>9.2f}{med(label, 'p99_ms'):>9.2f}"
            f"{rps / bare_rps:>7.2f}{stale:>7}"
        )
    print("ratio = real / bare requests/s (target >= 0.5); stale = series served older than PostgreSQL after the run")


if __name__ == "__main__":
    main()
