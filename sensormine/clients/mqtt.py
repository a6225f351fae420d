"""MQTT client module: the only place that turns SENSORMINE_MQTT_URL into a connected paho client."""

from __future__ import annotations

import re
import threading
import time
import uuid
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from sensormine.settings import Settings, get_settings

TELEMETRY_SUBSCRIPTION = "sensormine/+/+/telemetry"
_TOPIC_RE = re.compile(r"^sensormine/([^/]+)/([^/]+)/telemetry$")


def telemetry_topic(tenant_id: str, device_id: str) -> str:
    """The MQTT topic a device publishes its telemetry to."""
    return f"sensormine/{tenant_id}/{device_id}/telemetry"


def parse_telemetry_topic(topic: str) -> tuple[str, str] | None:
    """(tenant, device) from a telemetry topic, or None when the topic does not fit the contract."""
    m = _TOPIC_RE.match(topic)
    return (m[1], m[2]) if m else None


def broker_address(settings: Settings | None = None) -> tuple[str, int]:
    """(host, port) of the configured broker."""
    settings = settings or get_settings()
    if not settings.mqtt_url:
        raise RuntimeError("SENSORMINE_MQTT_URL is not set: run `sensormine services up` (or `make demo`)")
    url = urlparse(settings.mqtt_url)
    return url.hostname or "127.0.0.1", url.port or 1883


class MqttConnectError(ConnectionError):
    """The broker could not be reached, refused the CONNECT (bad credentials), or did not answer it."""


def _await_connack(client: mqtt.Client, who: str, timeout: float) -> None:
    """Run the client's network loop by hand until its CONNACK arrives; raise unless it is a success."""
    answer: list[ReasonCode] = []
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason_code: ReasonCode, _p: object = None) -> None:
        answer.append(reason_code)
        done.set()

    client.on_connect = on_connect
    deadline = time.monotonic() + timeout
    try:
        while not done.is_set():
            if time.monotonic() > deadline:
                raise MqttConnectError(f"the MQTT broker did not answer the CONNECT of {who} within {timeout:.0f} s")
            rc = client.loop(timeout=0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS and not done.is_set():
                raise MqttConnectError(f"the MQTT broker closed the connection of {who}: {mqtt.error_string(rc)}")
    finally:
        client.on_connect = None
    if answer[0].is_failure:
        client.disconnect()
        raise MqttConnectError(f"the MQTT broker refused the CONNECT of {who}: {answer[0]}")


def make_ingest_client(settings: Settings | None = None) -> mqtt.Client:
    """A connected MQTT 5 client with a persistent session and manual acknowledgements.

    The broker queues QoS 1 messages while the daemon is away (for `mqtt_session_expiry_s`) and
    redelivers any it never acknowledged, so a daemon acknowledges a message only once its
    readings are durable: a restart or crash loses nothing. It logs in as `mqtt_username` (the
    launcher's `sensormine-ingest` service client, which may subscribe to every telemetry topic).
    """
    settings = settings or get_settings()
    host, port = broker_address(settings)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=settings.mqtt_client_id or f"sensormine-ingest-{settings.env}",
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    if settings.mqtt_username:
        client.username_pw_set(settings.mqtt_username, settings.mqtt_password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.mqtt_session_expiry_s
    props.ReceiveMaximum = 10_000  # unacknowledged messages the broker may have in flight to us
    client.connect(host, port, keepalive=30, clean_start=False, properties=props)
    return client


def make_client(
    prefix: str,
    settings: Settings | None = None,
    username: str | None = None,
    password: str | None = None,
    *,
    mqtt5: bool = False,
    timeout: float = 10.0,
) -> mqtt.Client:
    """A connected (not yet looping) MQTT client with a unique client id (v3.1.1, or v5 with `mqtt5`).

    Logs in as `username`/`password` (a device: `{tenant}/{device}` and its device key); without
    them, as the settings' tools client (`mqtt_tools_username`, the launcher's privileged
    publisher for tests, benchmarks and tools), else anonymously. Returns once the broker has
    accepted the CONNECT, so bad credentials fail here with `MqttConnectError`; an `on_connect`
    callback set afterwards fires on reconnects only.
    """
    settings = settings or get_settings()
    host, port = broker_address(settings)
    if username is None and settings.mqtt_tools_username:
        username, password = settings.mqtt_tools_username, settings.mqtt_tools_password
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
    )
    if username:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect_timeout = timeout
    who = f"user {username!r}" if username else "an anonymous client"
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise MqttConnectError(f"cannot reach the MQTT broker at {host}:{port} ({who}): {exc}") from exc
    _await_connack(client, who, timeout)
    return client
