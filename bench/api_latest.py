"""Latest-value API benchmark: GET /api/query/latest on one uvicorn worker, against a bare FastAPI route.

Run with `uv run python -m bench.api_latest [--seconds 10] [--connections 4]` after `sensormine services
up` (and sourcing its env). On a scratch database: one tenant with `--devices` devices x `--metrics`
metrics, one reading every 10 s for two days (today and yesterday, ~35 k rows per series-day),
and an API key. Then, one after the other, each server runs as ONE uvicorn worker (httptools,
uvloop, no access log) in its own process:

- real: `serving.main:create_app` on the scratch database (auth with the credential cache,
  the planner's pipelined skip-scan query, JSON);
- bare: a FastAPI app with one `async def` route returning a constant JSON object.

A load generator in a third process keeps `--connections` HTTP/1.1 keep-alive connections busy
(asyncio over raw sockets, one request in flight per connection) for `--seconds` after a warm-up,
asking the real server for one device's latest values (every metric; the device rotates) and the
bare one for its constant. Prints requests/s, p50 and p99 for both, and the ratio (target >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
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
from sensormine.clients.postgres import ensure_partitions
from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
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


def run_server(factory: str, env: dict[str, str], path: str, headers: dict[str, str], args: argparse.Namespace) -> dict:
    """Start one uvicorn worker with `factory`, drive it from another process, stop it; the figures."""
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
        out = subprocess.run(
            [*drive, spec],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise RuntimeError(f"the load generator failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
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


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load, run both servers, print the figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--drive":
        drive_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.api_latest", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed load per server (after 1 s warm-up)")
    parser.add_argument("--connections", type=int, default=4, help="concurrent keep-alive connections")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--metrics", type=int, default=5)
    args = parser.parse_args(argv)
    base = os.environ.get("SENSORMINE_DATABASE_URL")
    if not base:
        raise SystemExit("SENSORMINE_DATABASE_URL is not set: run `uv run sensormine services up` and source its env")
    work = Path(tempfile.mkdtemp(prefix="bench-api-latest-"))
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
            say("real route ...")
            real = run_server(
                "bench.api_latest:real_app", env, "/api/query/latest?device_id=dev-{i:03d}", {"X-API-Key": key}, args
            )
            say("bare route ...")
            bare = run_server("bench.api_latest:bare_app", env, "/constant", {}, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"Latest-value API benchmark, {os.cpu_count()} cores: one uvicorn worker each, {args.connections} keep-alive "
        f"connections from a separate load-generator process, {args.seconds:g} s after a 1 s warm-up; "
        f"{args.devices} devices x {args.metrics} metrics, latest of one device (all metrics) per request\n\n"
        f"{'server':<44}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}\n{'-' * 76}"
    )
    for label, r in (("GET /api/query/latest (real app)", real), ("bare FastAPI async constant", bare)):
        print(f"{label:<44}{r['rps']:>12,.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")
    print(f"ratio real / bare (requests/s): {real['rps'] / bare['rps']:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
