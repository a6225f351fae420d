"""MQTT client module: the only place that turns SENSORMINE_MQTT_URL into a connected paho client."""

from __future__ import annotations

import re
import uuid
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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


def make_ingest_client(settings: Settings | None = None) -> mqtt.Client:
    """A connected MQTT 5 client with a persistent session and manual acknowledgements.

    The broker queues QoS 1 messages while the daemon is away (for `mqtt_session_expiry_s`) and
    redelivers any it never acknowledged, so a daemon acknowledges a message only once its
    readings are durable: a restart or crash loses nothing.
    """
    settings = settings or get_settings()
    host, port = broker_address(settings)
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=settings.mqtt_client_id or f"sensormine-ingest-{settings.env}",
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = settings.mqtt_session_expiry_s
    props.ReceiveMaximum = 10_000  # unacknowledged messages the broker may have in flight to us
    client.connect(host, port, keepalive=30, clean_start=False, properties=props)
    return client


def make_client(
    prefix: str, settings: Settings | None = None, username: str | None = None, password: str | None = None
) -> mqtt.Client:
    """A connected (not yet looping) MQTT v3.1.1 client with a unique client id."""
    host, port = broker_address(settings)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{prefix}-{uuid.uuid4().hex[:8]}")
    if username:
        client.username_pw_set(username, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=30)
    return client
