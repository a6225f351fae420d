"""Simulated MQTT devices: each publishes its signals to its telemetry topic at a fixed interval."""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt

from ingest_daemons.runner import stop_on_signals
from ingest_daemons.simulators.signals import MotorSignal, TankSignal
from sensormine.clients.mqtt import make_client, telemetry_topic

log = logging.getLogger("sensormine.sim.mqtt")


def _clients(devices: list[tuple[str, str]], keys: dict[str, str] | None) -> list[mqtt.Client]:
    """One client per device logged in with its device key; one shared default client without keys."""
    if not keys:
        return [make_client("sensormine-sim")] * len(devices)
    out: list[mqtt.Client] = []
    try:
        for tenant, device in devices:
            user = f"{tenant}/{device}"
            if user not in keys:
                raise SystemExit(f"no device key for {user} in the keys file")
            out.append(make_client(f"sim-{tenant}-{device}"[:40], username=user, password=keys[user]))
    except BaseException:
        for client in out:
            client.disconnect()
        raise
    return out


def run(
    devices: list[tuple[str, str]],
    interval_s: float,
    stop: threading.Event,
    dropout: float = 0.01,
    keys: dict[str, str] | None = None,
) -> int:
    """Publish for every (tenant, device) until `stop`; returns messages published.

    With `keys` ({"tenant/device": device key}) each device logs in as itself, as real devices do
    (the broker lets it publish to its own topic only); without, one client publishes for all.
    """
    clients = _clients(devices, keys)
    unique = list({id(c): c for c in clients}.values())
    for client in unique:
        client.loop_start()
    signals = [(t, d, MotorSignal(i) if i % 2 == 0 else TankSignal(i)) for i, (t, d) in enumerate(devices)]
    rng = random.Random(7)
    sent = 0
    try:
        while not stop.is_set():
            now = datetime.now(UTC)
            for client, (tenant, device, sig) in zip(clients, signals, strict=True):
                if rng.random() < dropout:  # a dropped sample, as real links do
                    continue
                body = {"ts": now.isoformat(timespec="milliseconds"), "values": sig.sample(now.timestamp())}
                client.publish(telemetry_topic(tenant, device), orjson.dumps(body), qos=1)
                sent += 1
            stop.wait(interval_s)
    finally:
        for client in unique:
            client.loop_stop()
            client.disconnect()
    return sent


def main() -> None:
    """Command line: `python -m ingest_daemons.simulators.mqtt_publisher tenant/device ...`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("devices", nargs="+", help="tenant/device pairs")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument(
        "--keys-file",
        type=Path,
        help='JSON file {"tenant/device": "smd_..."}: each device logs in with its own key',
    )
    args = parser.parse_args()
    keys = json.loads(args.keys_file.read_text()) if args.keys_file else None
    stop = stop_on_signals()
    pairs = [tuple(p.split("/", 1)) for p in args.devices]
    started = time.monotonic()
    sent = run(pairs, args.interval, stop, keys=keys)  # type: ignore[arg-type]
    log.info("published %d messages in %.0f s", sent, time.monotonic() - started)


if __name__ == "__main__":
    main()
