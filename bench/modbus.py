"""Registers per second the Modbus daemon polls from the simulator, against a bare pymodbus client loop.

The simulator runs in its own process (`python -m ingest_daemons.simulators.modbus_server
--static --bench-registers N`), so the daemon and the device each get a core, as on a real site.
Three phases of `--seconds` each, after a warm-up:

1. **bare client**: one `AsyncModbusTcpClient` per device reading the same 125-register blocks as
   fast as it can, decoding nothing: the ceiling of pymodbus + this simulator on this machine;
2. **daemon → counting sink**: the real `ModbusDaemon` (profiles from a scratch database, one poller
   per device, planning, decoding, one Reading per register, batching per poll) handing its batches
   to a sink that only counts them: what polling costs;
3. **daemon → Kafka** (when SENSORMINE_KAFKA_BOOTSTRAP is set): the same into `KafkaSink`, envelopes
   produced to Kafka and confirmed (flush) before the clock stops.

Each profile is N uint16 points (one metric per register) at a 10 ms poll interval, i.e. more
than the pipeline can do: the rates are saturation rates, and overruns are expected.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pymodbus.client import AsyncModbusTcpClient

from bench.common import rate, say, scratch_database
from ingest_daemons.modbus import ModbusDaemon
from ingest_daemons.modbus_codec import plan_reads
from ingest_daemons.simulators.modbus_server import bench_points
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.postgres import connect
from sensormine.devices.profiles import ModbusProfile, set_profile
from sensormine.devices.registry import create_device
from sensormine.ingest.sinks import Done, KafkaSink, ReadingSink
from sensormine.reading import Reading
from sensormine.settings import Settings, get_settings
from sensormine.tenancy.tenants import create_tenant

TENANT = "bench"


@contextmanager
def simulator_process(registers: int) -> Iterator[int]:
    """The simulator in a child process on a free port; yields the port."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ingest_daemons.simulators.modbus_server",
            "--port",
            "0",
            "--static",
            "--dropout-rate",
            "0",
            "--bench-registers",
            str(registers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(10)


class CountingSink:
    """A sink that only counts what it is handed."""

    def __init__(self) -> None:
        self.readings = 0

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        self.readings += len(readings)

    def reject(self, *args: object, **kwargs: object) -> None:
        """Nothing is rejected here."""

    def poll(self, timeout: float = 0.0) -> None:
        time.sleep(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        return 0


def bare_client_rate(port: int, devices: int, registers: int, seconds: float) -> float:
    """Registers/s read by `devices` concurrent bare clients looping over the daemon's read plan."""
    plan = plan_reads(bench_points(registers))

    async def one(counter: list[int], stop_at: float) -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0, reconnect_delay=0)
        await client.connect()
        try:
            while time.perf_counter() < stop_at:
                for r in plan:
                    got = await client.read_holding_registers(r.address, count=r.count, device_id=1)
                    counter[0] += len(got.registers)
        finally:
            client.close()

    async def run() -> float:
        counter = [0]
        await asyncio.gather(*(one([0], time.perf_counter() + 1.0) for _ in range(devices)))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one(counter, t0 + seconds) for _ in range(devices)))
        return rate(counter[0], time.perf_counter() - t0)

    return asyncio.run(run())


def daemon_rate(settings: Settings, sink: ReadingSink, seconds: float, warmup_s: float = 2.0) -> dict[str, float]:
    """Run the daemon over the stored profiles; registers/s and readings/s over `seconds` after a warm-up."""
    daemon = ModbusDaemon(settings, sink=sink, profile_refresh_s=60).start()
    try:
        time.sleep(warmup_s)
        t = daemon.stats.total()
        regs0, polls0, published0 = t.registers, t.polls, daemon.stats.sink.published_readings
        t0 = time.perf_counter()
        time.sleep(seconds)
        t = daemon.stats.total()
        regs1, polls1 = t.registers, t.polls
        # Readings count once the sink has them (for Kafka: once flushed, i.e. confirmed by the broker).
        sink.flush(60)
        published1 = daemon.stats.sink.published_readings
        elapsed = time.perf_counter() - t0
    finally:
        daemon.stop()
    total = daemon.stats.total()
    return {
        "registers_per_s": rate(regs1 - regs0, seconds),
        "readings_per_s": rate(published1 - published0, elapsed),
        "polls_per_s": rate(polls1 - polls0, seconds),
        "bad": float(total.bad),
        "overruns": float(total.overruns),
        "sink_waits": float(daemon.stats.sink.waits),
    }


def main() -> None:
    """Print the figures (the section "Modbus (bench.modbus)" of docs/benchmarks.md records a run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=4, help="profiles (connections) polling the simulator")
    parser.add_argument("--registers", type=int, default=2000, help="uint16 points per device")
    parser.add_argument("--interval-ms", type=int, default=10, help="poll interval of every profile")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each timed phase")
    parser.add_argument("--no-kafka", action="store_true", help="skip the Kafka phase")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(name)s %(levelname)s %(message)s")
    base = get_settings()
    if not base.database_url:
        sys.exit("SENSORMINE_DATABASE_URL is not set: `source .sensormine/services.env` first")

    with simulator_process(args.registers) as port, scratch_database(base.database_url) as url:
        settings = base.model_copy(update={"database_url": url, "env": f"bench{uuid.uuid4().hex[:6]}"})
        profile = ModbusProfile(
            host="127.0.0.1",
            port=port,
            poll_interval_ms=args.interval_ms,
            timeout_ms=2000,
            points=bench_points(args.registers),
        )
        with connect(settings) as conn:
            create_tenant(conn, TENANT)
            for i in range(args.devices):
                create_device(conn, TENANT, f"plc-{i}")
                set_profile(conn, TENANT, f"plc-{i}", profile)
        requests = len(plan_reads(profile.points))
        say(
            f"simulator on port {port}: {args.devices} devices x {args.registers} registers "
            f"({requests} reads per poll), {args.seconds:.0f} s per phase, {os.cpu_count()} cores"
        )

        say("bare pymodbus client loop ...")
        bare = bare_client_rate(port, args.devices, args.registers, args.seconds)
        say("daemon -> counting sink ...")
        counting = daemon_rate(settings, CountingSink(), args.seconds)
        kafka: dict[str, float] | None = None
        if settings.kafka_bootstrap and not args.no_kafka:
            say("daemon -> Kafka ...")
            ensure_topics([settings.telemetry_topic(TENANT)], settings=settings)
            kafka = daemon_rate(settings, KafkaSink(settings), args.seconds)

    print()
    print(f"Modbus polling, {args.devices} devices x {args.registers} uint16 registers, {args.seconds:.0f} s phases")
    print(f"{'path':<28}{'registers/s':>14}{'readings/s':>14}{'polls/s':>10}{'ratio':>8}")
    print(f"{'bare pymodbus client':<28}{bare:>14,.0f}{'':>14}{'':>10}{1.0:>8.2f}")
    rows = [("daemon -> counting sink", counting)] + ([("daemon -> Kafka", kafka)] if kafka else [])
    for name, r in rows:
        print(
            f"{name:<28}{r['registers_per_s']:>14,.0f}{r['readings_per_s']:>14,.0f}"
            f"{r['polls_per_s']:>10,.1f}{rate(r['registers_per_s'], bare):>8.2f}"
        )
    for name, r in rows:
        print(
            f"{name}: bad readings {r['bad']:.0f}, poll overruns {r['overruns']:.0f}, "
            f"polls that waited for the sink {r['sink_waits']:.0f}"
        )
    best = max(r["registers_per_s"] for _, r in rows)
    print(f"target >= 50,000 registers/s: {'met' if best >= 50_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
