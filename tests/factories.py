"""Factory helpers for tests: tenants with devices and keys, readings, Kafka envelopes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import psycopg

from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
from sensormine.reading import Reading, datetime_to_us
from sensormine.tenancy.tenants import create_tenant


class Daemon(Protocol):
    """A consumer daemon (hot store, metering, stream processor): runs until stopped or idle."""

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> Any: ...

    def close(self) -> None: ...


D = TypeVar("D", bound=Daemon)


def run_until_idle(daemon: D, idle_s: float = 2.0) -> D:
    """Run `daemon` until nothing arrived for `idle_s`, then close it; returns it (with its stats)."""
    try:
        daemon.run(threading.Event(), idle_exit_s=idle_s)
    finally:
        daemon.close()
    return daemon


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
    from sensormine.clients.mqtt import make_client

    client = make_client("test-pub", settings, settings.mqtt_tools_username, settings.mqtt_tools_password)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout)
    client.loop_stop()
    client.disconnect()


def wait_until(check, timeout: float = 30.0, interval: float = 0.05):
    """Poll `check` every `interval` seconds until it answers something truthy or `timeout` seconds pass.

    Returns that answer (so a probe can hand back what it found), or the last falsy one.
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(interval)
    return check()


def wait_for(check, what: str, timeout: float = 30.0):
    """`wait_until`, failing with what was awaited when `timeout` passes; returns the truthy answer."""
    answer = wait_until(check, timeout)
    if not answer:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    return answer


def sensor_tick(name: str, instance, cursor: str | None = None):
    """One tick of a sensor of `orchestration.definitions.defs`, evaluated as the daemon's code server does.

    The sensor comes from the loaded Definitions and gets exactly the resources they bind to its
    required keys (not the decorated function called with resources handed in by the test), so a
    sensor that the daemon could not run fails here too. Returns the tick's SensorExecutionData.
    """
    import dagster as dg

    from orchestration.definitions import defs

    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def(name)
    resources = {k: v for k, v in repo.get_top_level_resources().items() if k in sensor.required_resource_keys}
    # The daemon hands the code server an instance reference, through which run requests are
    # checked against the instance's dynamic partitions: so a persistent instance, as there.
    ref = instance.get_ref()
    with dg.build_sensor_context(
        instance=instance, instance_ref=ref, cursor=cursor, repository_def=repo, resources=resources
    ) as ctx:
        return sensor.evaluate_tick(ctx)


def schedule_tick(name: str, instance, scheduled_execution_time):
    """One tick of a schedule of `orchestration.definitions.defs` at a given time, as the daemon evaluates it."""
    import dagster as dg

    from orchestration.definitions import defs

    repo = defs.get_repository_def()
    schedule = repo.get_schedule_def(name)
    resources = {k: v for k, v in repo.get_top_level_resources().items() if k in schedule.required_resource_keys}
    with dg.build_schedule_context(
        instance=instance, scheduled_execution_time=scheduled_execution_time, repository_def=repo, resources=resources
    ) as ctx:
        return schedule.evaluate_tick(ctx)
