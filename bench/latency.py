"""Latency from an MQTT publish to a point being queryable, on the Kafka path and the in-process path.

The issue's promise is "queryable within a second": this measures it. Each sample publishes one
device payload (two metrics) at QoS 1 and polls, every 2 ms, the hot-store query the API runs
(`query.hot.hot_points`, under row-level security) until both points are there.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import psycopg

from bench.common import say, scratch_database
from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.mqtt import MqttDaemon
from query.hot import hot_points
from sensormine.clients.kafka import ensure_topics, make_admin
from sensormine.clients.mqtt import make_client, telemetry_topic
from sensormine.devices.registry import create_device
from sensormine.settings import Settings, get_settings
from sensormine.tenancy.tenants import create_tenant

TENANT, DEVICE = "lat", "probe-1"


def _samples(settings: Settings, url: str, n: int) -> list[float]:
    """Publish n payloads one after another; seconds from publish to both points visible."""
    client = make_client("bench-latency", settings)
    client.loop_start()
    base = datetime(2026, 11, 26, tzinfo=UTC)
    out: list[float] = []
    with psycopg.connect(url, autocommit=False) as conn:
        for i in range(n):
            ts = base + timedelta(seconds=i)
            body = orjson.dumps({"ts": ts.isoformat(), "values": {"temperature": 20.0 + i, "pressure": 1.0}})
            t0 = time.perf_counter()
            client.publish(telemetry_topic(TENANT, DEVICE), body, qos=1)
            while True:
                got = hot_points(conn, [TENANT], TENANT, [DEVICE], None, ts, ts + timedelta(microseconds=1), {})
                if got.num_rows == 2:
                    out.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError(f"sample {i} not visible after 10 s")
                time.sleep(0.002)
    client.loop_stop()
    client.disconnect()
    return out


def _percentiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100)
    return f"p50 {q[49] * 1000:7.1f} ms   p95 {q[94] * 1000:7.1f} ms   max {max(xs) * 1000:7.1f} ms"


def measure(path: str, base: Settings, n: int) -> list[float]:
    """Latency samples for one path: 'kafka' (daemon → Kafka → consumer) or 'direct' (in-process)."""
    with scratch_database(base.database_url or "", prefix="bench_lat") as url:
        env = f"lat{uuid.uuid4().hex[:6]}"
        settings = base.model_copy(
            update={
                "database_url": url,
                "env": env,
                "consumer_group": f"{env}-g",
                "kafka_bootstrap": base.kafka_bootstrap if path == "kafka" else None,
            }
        )
        with psycopg.connect(url) as conn:
            create_tenant(conn, TENANT)
            create_device(conn, TENANT, DEVICE)
        stop = threading.Event()
        worker = None
        if path == "kafka":
            ensure_topics([settings.telemetry_topic(TENANT)], settings=settings)
            consumer = HotStoreConsumer(settings)
            worker = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
            worker.start()
            consumer.assigned.wait(30)
        daemon = MqttDaemon(settings).start()
        try:
            _samples(settings, url, 5)  # warm-up: connections, first partition, first fetch
            return _samples(settings, url, n)
        finally:
            daemon.stop()
            stop.set()
            if worker is not None:
                worker.join(30)
                consumer.close()
                make_admin(settings).delete_topics([settings.telemetry_topic(TENANT)])


def main(argv: list[str] | None = None) -> None:
    """Print latency percentiles for both write paths."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    settings = get_settings()
    if not (settings.database_url and settings.mqtt_url and settings.kafka_bootstrap):
        raise SystemExit("start the services first: `make services-up`, then `source .sensormine/services.env`")
    results = {}
    for path in ("direct", "kafka"):
        say(f"{path}: {args.samples} samples ...")
        results[path] = measure(path, settings, args.samples)
    print(f"\nMQTT publish → queryable in the hot store ({args.samples} samples each, one at a time)")
    print("measured: the hot-store query the API runs (cold path: no latest-value cache, no rollup)")
    for path, xs in results.items():
        label = "in-process (no Kafka)" if path == "direct" else "Kafka + consumer"
        print(f"  {label:<22} {_percentiles(xs)}")
    over = {p: sum(x > 1.0 for x in xs) for p, xs in results.items()}
    print(f"  samples over 1 s: {over}")


if __name__ == "__main__":
    main()
