"""Factory helpers for tests: tenants with devices and keys, readings, Kafka envelopes."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from sensormine.reading import Reading, datetime_to_us
from sensormine.registry import create_api_key, create_device, create_tenant

DAY = datetime(2026, 11, 26, tzinfo=UTC)
DAY_US = datetime_to_us(DAY)


def make_tenant(
    conn: psycopg.Connection,
    tenant_id: str,
    devices: list[str],
    parent_id: str | None = None,
    plan: str | None = None,
    role: str = "operator",
) -> str:
    """Create a tenant with devices; returns an API key of `role`.

    A top-level tenant is on the pro plan unless told otherwise (its rate limit of 100 requests a
    second stays clear of tests that poll); a sub-tenant inherits its parent's plan.
    """
    create_tenant(conn, tenant_id, parent_id=parent_id, plan=plan or (None if parent_id else "pro"))
    for d in devices:
        create_device(conn, tenant_id, d)
    return create_api_key(conn, tenant_id, "test", role=role)


def readings(
    tenant_id: str,
    device_id: str,
    n: int,
    metrics: tuple[str, ...] = ("temperature", "pressure"),
    start_us: int = DAY_US,
    step_us: int = 1_000_000,
) -> list[Reading]:
    """n timestamps x metrics readings with values derived from their position."""
    return [
        Reading(tenant_id, device_id, m, start_us + i * step_us, float(i) + j / 10, 0, start_us)
        for i in range(n)
        for j, m in enumerate(metrics)
    ]


def drain_topic(bootstrap: str, topic: str, idle_s: float = 3.0, max_s: float = 60.0) -> list:
    """Every message currently in a topic (read from the beginning until idle)."""
    import time
    import uuid

    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"drain-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list = []
    deadline = time.monotonic() + max_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            msgs = consumer.consume(500, timeout=0.5)
            got = [m for m in msgs if m.error() is None]
            if got:
                out.extend(got)
                last = time.monotonic()
    finally:
        consumer.close()
    return out


def mqtt_publish(settings, messages: list[tuple[str, bytes]], timeout: float = 30.0) -> None:
    """Publish (topic, payload) pairs at QoS 1 and wait until the broker has acknowledged each.

    Publishes as the launcher's privileged tools client (any `sensormine/#` topic, so also for
    unregistered devices), or anonymously when the broker has no users (embedded amqtt).
    """
    from sensormine.mqtt import make_client

    client = make_client("test-pub", settings, settings.mqtt_tools_username, settings.mqtt_tools_password)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout)
    client.loop_stop()
    client.disconnect()


def wait_until(check, timeout: float = 30.0) -> bool:
    """Poll `check` every 50 ms until it holds or `timeout` seconds pass; its last answer."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
