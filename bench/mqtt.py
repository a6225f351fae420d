"""MQTT benchmark: messages/s the ingest daemon moves from Mosquitto into Kafka, against a bare subscriber.

Run with `uv run python -m bench.mqtt [--messages 100000]` after `sensormine services up`.

Both sides drain the same backlog: N QoS 1 messages are queued by Mosquitto for a persistent
MQTT 5 session while its client is away (published beforehand by several publisher processes,
so the publisher's speed is not what is measured), then the client connects and the clock runs
from connect until the last message is done:
- bare: a paho subscriber on its network thread that only counts (and acknowledges) messages;
- daemon: `ingest_daemons.mqtt.MqttDaemon` as shipped (Kafka sink behind the store-and-forward
  buffer, device status counting), until the tenant's topic holds N messages (its
  acknowledgements wait for Kafka's delivery reports).
The ratio is daemon / bare. Mosquitto keeps at most `max_queued_messages` (100 000 as the
launcher configures it) per session, which bounds N.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
import uuid

import orjson
import paho.mqtt.client as mqtt
from confluent_kafka import TopicPartition
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import rate, say, scratch_database
from ingest_daemons.mqtt import MqttDaemon
from sensormine.clients.kafka import ensure_topics, make_admin, make_consumer
from sensormine.clients.mqtt import broker_address, telemetry_topic
from sensormine.clients.postgres import connect
from sensormine.devices.registry import create_device
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant

TENANT = "benchmqtt"


def _payload(i: int) -> bytes:
    ts = 1_764_115_200_000 + i * 10  # 2025-11-26 onwards, ms
    return orjson.dumps({"ts": ts, "values": {"temperature": 20 + (i % 100) / 10, "pressure": 1 + (i % 7) / 100}})


def _publish_share(
    host: str, port: int, login: tuple[str | None, str | None], topics: list[str], start: int, stop: int
) -> None:
    """One publisher process: messages start..stop at QoS 1, round-robin over the device topics."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    if login[0]:
        client.username_pw_set(*login)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    infos = [client.publish(topics[i % len(topics)], _payload(i), qos=1) for i in range(start, stop)]
    for info in infos:
        info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


def publish_backlog(settings: Settings, topics: list[str], n: int, publishers: int) -> float:
    """Publish n messages from `publishers` processes; returns seconds."""
    host, port = broker_address(settings)
    bounds = [n * k // publishers for k in range(publishers + 1)]
    t0 = time.perf_counter()
    procs = [
        multiprocessing.Process(
            target=_publish_share, args=(host, port, _tools_login(settings), topics, bounds[k], bounds[k + 1])
        )
        for k in range(publishers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError("a publisher failed")
    return time.perf_counter() - t0


def _tools_login(settings: Settings) -> tuple[str | None, str | None]:
    """The launcher's privileged tools user (publish and subscribe on sensormine/#), when the broker has one."""
    return settings.mqtt_tools_username, settings.mqtt_tools_password


def _session_client(settings: Settings, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    username, password = _tools_login(settings)
    if username:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(1000)
    return client


def _connect(client: mqtt.Client, settings: Settings) -> None:
    host, port = broker_address(settings)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    props.ReceiveMaximum = 10_000
    client.connect(host, port, keepalive=30, clean_start=False, properties=props)


def bare_trial(settings: Settings, topics: list[str], n: int, publishers: int) -> float:
    """Seconds for a counting subscriber to drain n queued messages."""
    client_id = f"bench-bare-{uuid.uuid4().hex[:8]}"
    client = _session_client(settings, client_id)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    _connect(client, settings)
    client.loop_start()
    client.subscribe("sensormine/+/+/telemetry", qos=1)
    subscribed.wait(10)
    client.disconnect()
    client.loop_stop()
    publish_backlog(settings, topics, n, publishers)

    done = threading.Event()
    count = 0

    def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    client = _session_client(settings, client_id)
    client.on_message = on_message
    t0 = time.perf_counter()
    _connect(client, settings)
    client.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"bare subscriber got {count} of {n} messages")
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return elapsed


def _topic_messages(settings: Settings, topic: str) -> int:
    consumer = make_consumer(f"bench-offsets-{uuid.uuid4().hex[:6]}", settings)
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def daemon_trial(settings: Settings, topics: list[str], n: int, publishers: int) -> float:
    """Seconds for the ingest daemon to move n queued messages into Kafka."""
    client_id = f"bench-daemon-{uuid.uuid4().hex[:8]}"
    trial = settings.model_copy(update={"mqtt_client_id": client_id})
    topic = trial.telemetry_topic(TENANT)
    before = _topic_messages(trial, topic)
    daemon = MqttDaemon(trial).start()  # creates the session
    daemon.stop()
    publish_backlog(trial, topics, n, publishers)
    daemon = MqttDaemon(trial)  # as shipped: Kafka sink behind the store-and-forward buffer, status counts
    t0 = time.perf_counter()
    daemon.start()
    deadline = time.monotonic() + 300
    while daemon.ingest.stats.received < n and time.monotonic() < deadline:
        time.sleep(0.02)
    daemon.sink.flush(60)
    elapsed = time.perf_counter() - t0
    daemon.stop()
    got = _topic_messages(trial, topic) - before
    if got != n or daemon.ingest.stats.accepted != n:
        raise RuntimeError(f"daemon moved {got} messages into Kafka (accepted {daemon.ingest.stats.accepted}), not {n}")
    return elapsed


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the trials, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.mqtt", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="backlog per trial (<= 100 000)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes filling the backlog")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args(argv)
    base = Settings()
    if not (base.database_url and base.kafka_bootstrap and base.mqtt_url):
        raise SystemExit("run `uv run sensormine services up` and source .sensormine/services.env first")
    env = f"bench{uuid.uuid4().hex[:6]}"
    times: dict[str, list[float]] = {"bare": [], "daemon": []}
    with scratch_database(base.database_url, "bench_mqtt") as url:
        settings = base.model_copy(update={"database_url": url, "env": env})
        with connect(settings) as conn:
            create_tenant(conn, TENANT)
            devices = [f"dev-{k:03d}" for k in range(args.devices)]
            for d in devices:
                create_device(conn, TENANT, d)
        ensure_topics([settings.telemetry_topic(TENANT), settings.dlq_topic], settings=settings)
        topics = [telemetry_topic(TENANT, d) for d in devices]
        try:
            for trial in range(args.trials):
                for label, fn in (("bare", bare_trial), ("daemon", daemon_trial)):
                    seconds = fn(settings, topics, args.messages, args.publishers)
                    times[label].append(seconds)
                    say(f"trial {trial + 1}/{args.trials} {label}: {rate(args.messages, seconds):,.0f} msg/s")
        finally:
            make_admin(settings).delete_topics([settings.telemetry_topic(TENANT), settings.dlq_topic])
    bare, daemon = statistics.median(times["bare"]), statistics.median(times["daemon"])
    print(
        f"MQTT benchmark, {os.cpu_count()} cores: drain a backlog of {args.messages:,} QoS 1 messages "
        f"(2 readings each, {args.devices} devices); median of {args.trials} trials\n"
        "measured: the MQTT ingest path into Kafka (no cache, no rollup)\n\n"
        f"{'path':<46}{'seconds':>9}{'msg/s':>12}\n{'-' * 67}\n"
        f"{'bare paho subscriber (counts only)':<46}{bare:>9.2f}{rate(args.messages, bare):>12,.0f}\n"
        f"{'ingest daemon -> Kafka (acked after delivery)':<46}{daemon:>9.2f}{rate(args.messages, daemon):>12,.0f}\n\n"
        f"daemon: {rate(args.messages, daemon):,.0f} msg/s (target >= 20 000); "
        f"ratio daemon / bare: {rate(bare, daemon):.2f} (target >= 0.5)"
    )


if __name__ == "__main__":
    main()
