"""Registers per second the Modbus daemon polls from the simulator, against a bare pymodbus client loop.

The simulator runs in its own process (`python -m ingest_daemons.simulators.modbus_server
--static --bench-registers N`), so the daemon and the device each get a core, as on a real site.
Three phases of `--seconds` each, after a warm-up:

1. **bare client**: one `AsyncModbusTcpClient` per device reading the same 125-register blocks as
   fast as it can, decoding nothing: the ceiling of pymodbus + this simulator on this machine;
2. **daemon → counting sink**: the real `ModbusDaemon` (profiles from a scratch database, one poller
   per device, planning, decoding, one Reading per register, batching per poll) handing its batches
   to a sink that only counts them: what polling costs;
3. **daemon → Kafka** (when SENSORMINE_KAFKA_BOOTSTRAP is set): the same into `KafkaSink`. Readings
   count only once Kafka has confirmed them: the sink's delivery callbacks (`SinkStats.durable`)
   counted at the start and the end of the timed window, not what was handed to the producer. After
   the daemon stops, the topic's high watermarks (messages Kafka holds) are checked against the
   confirmed batches, so a confirmation that Kafka does not hold would show.

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
        if done is not None:
            done()  # nothing to wait for: "confirmed" at once

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


def topic_messages(settings: Settings, topic: str) -> int:
    """Messages Kafka holds in `topic`: the sum of its partitions' high watermarks (the topic starts empty)."""
    from confluent_kafka import TopicPartition

    from sensormine.clients.kafka import make_consumer

    consumer = make_consumer(f"bench-watermarks-{uuid.uuid4().hex[:6]}", settings)
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions)
    finally:
        consumer.close()


def daemon_rate(
    settings: Settings, sink: ReadingSink, seconds: float, warmup_s: float = 2.0, topic: str | None = None
) -> dict[str, float]:
    """Run the daemon over the stored profiles; registers/s polled and readings/s confirmed over `seconds`.

    Readings count once the sink confirmed them (its `done` callback: for Kafka, the delivery report),
    between the start and the end of the window. With `topic` (Kafka), the topic's watermarks are
    checked against everything confirmed once the daemon has stopped.
    """
    daemon = ModbusDaemon(settings, sink=sink, profile_refresh_s=60).start()
    try:
        time.sleep(warmup_s)
        t, s = daemon.stats.total(), daemon.stats.sink
        regs0, polls0, durable0, handed0 = t.registers, t.polls, s.durable, s.published_readings
        t0 = time.perf_counter()
        time.sleep(seconds)
        t, s = daemon.stats.total(), daemon.stats.sink
        regs1, polls1, durable1, handed1 = t.registers, t.polls, s.durable, s.published_readings
        elapsed = time.perf_counter() - t0
    finally:
        daemon.stop()  # flushes the sink: every handed-over batch confirmed (or failed) by now
    total, s = daemon.stats.total(), daemon.stats.sink
    result = {
        "registers_per_s": rate(regs1 - regs0, elapsed),
        "readings_per_s": rate(durable1 - durable0, elapsed),
        "handed_per_s": rate(handed1 - handed0, elapsed),
        "polls_per_s": rate(polls1 - polls0, elapsed),
        "bad": float(total.bad),
        "overruns": float(total.overruns),
        "sink_waits": float(s.waits),
        "unconfirmed": float(s.published_readings - s.durable),
    }
    if topic is not None:
        held = topic_messages(settings, topic)
        if held != s.published_batches:
            raise RuntimeError(
                f"Kafka holds {held} messages in {topic}, the daemon had {s.published_batches} confirmed"
            )
        result["kafka_messages"] = float(held)
    return result


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
            topic = settings.telemetry_topic(TENANT)
            ensure_topics([topic], settings=settings)
            kafka = daemon_rate(settings, KafkaSink(settings), args.seconds, topic=topic)

    print()
    print(f"Modbus polling, {args.devices} devices x {args.registers} uint16 registers, {args.seconds:.0f} s phases")
    print("measured: the polling path end to end (no cache, no rollup); readings/s = confirmed by the sink")
    print(f"{'path':<28}{'registers/s':>14}{'readings/s':>14}{'handed/s':>12}{'polls/s':>10}{'ratio':>8}")
    print(f"{'bare pymodbus client':<28}{bare:>14,.0f}{'':>14}{'':>12}{'':>10}{1.0:>8.2f}")
    rows = [("daemon -> counting sink", counting)] + ([("daemon -> Kafka", kafka)] if kafka else [])
    for name, r in rows:
        print(
            f"{name:<28}{r['registers_per_s']:>14,.0f}{r['readings_per_s']:>14,.0f}{r['handed_per_s']:>12,.0f}"
            f"{r['polls_per_s']:>10,.1f}{rate(r['registers_per_s'], bare):>8.2f}"
        )
    for name, r in rows:
        print(
            f"{name}: bad readings {r['bad']:.0f}, poll overruns {r['overruns']:.0f}, "
            f"polls that waited for the sink {r['sink_waits']:.0f}, unconfirmed after stop {r['unconfirmed']:.0f}"
            + (f", messages in Kafka {r['kafka_messages']:,.0f} (= batches confirmed)" if "kafka_messages" in r else "")
        )
    print(
        "readings/s: confirmed during the window (Kafka: delivery reports); handed/s: given to the sink; "
        "ratio: registers/s against the bare client"
    )
    for name, r in rows:
        print(f"target >= 50,000 readings/s confirmed, {name}: {'met' if r['readings_per_s'] >= 50_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
