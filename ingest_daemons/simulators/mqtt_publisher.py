"""Simulated MQTT devices: each publishes its signals to its telemetry topic at a fixed interval."""

from __future__ import annotations

import argparse
import logging
import random
import signal
import threading
import time
from datetime import UTC, datetime

import orjson

from ingest_daemons.simulators.signals import MotorSignal, TankSignal
from sensormine.mqtt import make_client, telemetry_topic

log = logging.getLogger("sensormine.sim.mqtt")


def run(devices: list[tuple[str, str]], interval_s: float, stop: threading.Event, dropout: float = 0.01) -> int:
    """Publish for every (tenant, device) until `stop`; returns messages published."""
    client = make_client("sensormine-sim")
    client.loop_start()
    signals = [(t, d, MotorSignal(i) if i % 2 == 0 else TankSignal(i)) for i, (t, d) in enumerate(devices)]
    rng = random.Random(7)
    sent = 0
    try:
        while not stop.is_set():
            now = datetime.now(UTC)
            for tenant, device, sig in signals:
                if rng.random() < dropout:  # a dropped sample, as real links do
                    continue
                body = {"ts": now.isoformat(timespec="milliseconds"), "values": sig.sample(now.timestamp())}
                client.publish(telemetry_topic(tenant, device), orjson.dumps(body), qos=1)
                sent += 1
            stop.wait(interval_s)
    finally:
        client.loop_stop()
        client.disconnect()
    return sent


def main() -> None:
    """Command line: `python -m ingest_daemons.simulators.mqtt_publisher tenant/device ...`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("devices", nargs="+", help="tenant/device pairs")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    pairs = [tuple(p.split("/", 1)) for p in args.devices]
    started = time.monotonic()
    sent = run(pairs, args.interval, stop)  # type: ignore[arg-type]
    log.info("published %d messages in %.0f s", sent, time.monotonic() - started)


if __name__ == "__main__":
    main()
