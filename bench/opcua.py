"""OPC UA benchmark: notifications/s one daemon process handles from the simulator, 5 000 monitored items.

Run with `uv run python -m bench.opcua` after `sensormine services up` (it reads
SENSORMINE_DATABASE_URL and SENSORMINE_KAFKA_BOOTSTRAP). It creates its own database and topic
prefix and removes them at the end.

The simulator runs in its own process (`python -m ingest_daemons.simulators.opcua_server
--extra 5000`), writing a new value to each of its 5 000 variables every tick; the daemon runs in
this process, subscribed to all of them through one device profile, with the Kafka sink. For each
offered rate (one per tick interval) the run measures, over a fixed window after a warm-up:

- notifications/s the daemon converted (data changes received and turned into readings);
- readings/s Kafka acknowledged (durable), and that nothing was left behind at the end;
- the daemon process's CPU use (all its threads, librdkafka's included), and from it the
  notifications per CPU-second: the daemon's capacity on one core.

The simulator shares the machine's cores with the daemon; when it cannot keep its schedule, the
offered rate (what it actually wrote) is below the nominal one, and that is reported too.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

from bench.common import rate, say, scratch_database
from ingest_daemons.opcua import Backoff, OpcUaDaemon, OpcUaOptions, quiet_asyncua_logging
from sensormine.clients.kafka import ensure_topics, make_admin
from sensormine.clients.postgres import connect
from sensormine.devices.profiles import set_profile
from sensormine.devices.registry import create_device
from sensormine.settings import Settings, get_settings
from sensormine.tenancy.tenants import create_tenant

TENANT, DEVICE = "bench", "opcua-sim"


@dataclass
class Step:
    """One measured rate."""

    interval_s: float
    window_s: float
    offered: float  # values/s the simulator wrote during the window (its own count)
    notifications: int
    durable: int
    cpu_s: float


def start_simulator(items: int, interval_s: float) -> tuple[subprocess.Popen[str], str]:
    """The simulator process and its endpoint (it prints it first)."""
    cmd = [
        sys.executable,
        "-m",
        "ingest_daemons.simulators.opcua_server",
        "--port=0",
        "--motors=0",
        "--tanks=0",
        f"--extra={items}",
        f"--interval={interval_s}",
        "--seed=1",
        "--dropout-rate=0",
        "--spike-rate=0",
        "--fast",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("opc.tcp://"):
        proc.kill()
        raise RuntimeError(f"simulator did not start: {endpoint!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, endpoint


def stop_simulator(proc: subprocess.Popen[str]) -> tuple[int, float]:
    """Stop it; returns (values written, seconds) from its closing log line."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    found = re.search(r"wrote (\d+) values in ([\d.]+) s", err)
    return (int(found.group(1)), float(found.group(2))) if found else (0, 0.0)


def measure(settings: Settings, items: int, interval_s: float, publishing_ms: float, window_s: float) -> Step:
    """Run the simulator at one tick interval and the daemon against it; measure over `window_s`."""
    proc, endpoint = start_simulator(items, interval_s)
    daemon: OpcUaDaemon | None = None
    try:
        nodes = [
            {"node_id": f"ns=2;s=extra.{i:05d}", "metric": f"m{i:05d}", "sampling_interval_ms": 0} for i in range(items)
        ]
        with connect(settings) as conn:
            set_profile(
                conn,
                TENANT,
                DEVICE,
                {"protocol": "opcua", "endpoint": endpoint, "publishing_interval_ms": publishing_ms, "nodes": nodes},
            )
            conn.commit()
        options = OpcUaOptions(profile_poll_s=3600, backoff=Backoff(initial_s=0.5, max_s=2), request_timeout_s=60)
        daemon = OpcUaDaemon(settings, options=options).start()
        if not daemon.wait_connected(120):
            raise RuntimeError("the daemon did not subscribe")
        time.sleep(3)  # warm-up: initial values, then steady state
        n0, d0, c0, t0 = (
            daemon.stats().notifications,
            daemon.worker.stats.durable,
            time.process_time(),
            time.monotonic(),
        )
        time.sleep(window_s)
        n1, d1, c1, t1 = (
            daemon.stats().notifications,
            daemon.worker.stats.durable,
            time.process_time(),
            time.monotonic(),
        )
        daemon.stop()  # flushes: everything handed over must be acknowledged
        written, sim_s = stop_simulator(proc)
        stats = daemon.stats()
        if stats.durable != stats.readings:
            raise RuntimeError(f"{stats.readings - stats.durable} readings were not acknowledged by Kafka")
        if stats.notifications != stats.readings:
            raise RuntimeError(f"{stats.notifications - stats.readings} notifications did not become readings")
        return Step(interval_s, t1 - t0, rate(written, sim_s), n1 - n0, d1 - d0, c1 - c0)
    finally:
        if proc.poll() is None:
            proc.kill()
        if daemon is not None:
            daemon.stop()  # again after a failure: stopping is idempotent


def report(items: int, publishing_ms: float, steps: list[Step]) -> str:
    """The results table."""
    lines = [
        f"OPC UA daemon: {items:,} monitored items in one subscription (publishing interval {publishing_ms:g} ms), "
        "Kafka sink",
        "",
        "| tick interval | nominal values/s | simulator wrote/s | notifications/s handled | durable readings/s "
        "| daemon CPU | notifications per CPU-s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        cpu = s.cpu_s / s.window_s
        lines.append(
            f"| {s.interval_s:g} s | {items / s.interval_s:,.0f} | {s.offered:,.0f} | "
            f"**{rate(s.notifications, s.window_s):,.0f}** | {rate(s.durable, s.window_s):,.0f} | "
            f"{cpu:.0%} | {rate(s.notifications, s.cpu_s):,.0f} |"
        )
    best = max(rate(s.notifications, s.window_s) for s in steps)
    lines += ["", f"best: {best:,.0f} notifications/s (target >= 5,000: {'met' if best >= 5000 else 'NOT met'})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run each rate, print the table; everything created is removed."""
    parser = argparse.ArgumentParser(prog="python -m bench.opcua", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5_000, help="monitored items (simulator variables)")
    parser.add_argument(
        "--intervals", default="1,0.5,0.25", help="simulator tick intervals to try, seconds (comma-separated)"
    )
    parser.add_argument("--publishing-ms", type=float, default=100.0, help="subscription publishing interval")
    parser.add_argument("--window", type=float, default=15.0, help="seconds measured per rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    quiet_asyncua_logging()

    env_settings = get_settings()
    if not env_settings.database_url or not env_settings.kafka_bootstrap:
        raise SystemExit("set SENSORMINE_DATABASE_URL and SENSORMINE_KAFKA_BOOTSTRAP: source .sensormine/services.env")
    env = f"bench{uuid.uuid4().hex[:8]}"
    steps: list[Step] = []
    with scratch_database(env_settings.database_url) as url:
        settings = Settings(env=env, database_url=url, kafka_bootstrap=env_settings.kafka_bootstrap)
        with connect(settings) as conn:
            create_tenant(conn, TENANT)
            create_device(conn, TENANT, DEVICE)
            conn.commit()
        ensure_topics([settings.telemetry_topic(TENANT)], settings=settings)
        try:
            for interval in [float(x) for x in args.intervals.split(",")]:
                say(f"tick interval {interval:g} s: {args.items / interval:,.0f} values/s nominal")
                step = measure(settings, args.items, interval, args.publishing_ms, args.window)
                handled, cpu = rate(step.notifications, step.window_s), step.cpu_s / step.window_s
                say(f"  {handled:,.0f} notifications/s, daemon CPU {cpu:.0%}")
                steps.append(step)
        finally:
            admin = make_admin(settings)
            for fut in admin.delete_topics([settings.telemetry_topic(TENANT)], operation_timeout=30).values():
                fut.result(30)
    print(report(args.items, args.publishing_ms, steps), flush=True)
    print("measured: the OPC UA ingest path into Kafka (no cache, no rollup)")
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
