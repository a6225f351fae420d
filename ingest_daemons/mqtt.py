"""MQTT ingest daemon: subscribes to every device's telemetry topic, normalises, hands to the sink."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from ingest_daemons.buffer import make_buffered_sink
from ingest_daemons.runner import report_until, stop_on_signals
from sensormine.clients.mqtt import TELEMETRY_SUBSCRIPTION, make_ingest_client, parse_telemetry_topic
from sensormine.clients.postgres import INGEST, connect
from sensormine.devices.registry import DeviceDirectory
from sensormine.devices.status import tracked
from sensormine.ingest.sinks import Done, ReadingSink
from sensormine.reading import now_us
from sensormine.settings import Settings, get_settings
from sensormine.telemetry.payload import PayloadError, parse_device_payload

log = logging.getLogger("sensormine.ingest.mqtt")
SOURCE = "mqtt"


@dataclass
class MqttStats:
    """Counters since start."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0


class MqttIngest:
    """Turns MQTT messages into readings (or dead letters); one instance per process."""

    def __init__(self, sink: ReadingSink, is_registered: Callable[[str, str], bool]) -> None:
        self.sink = sink
        self.is_registered = is_registered
        self.stats = MqttStats()

    def handle(self, topic: str, payload: bytes, done: Done | None = None) -> bool:
        """Process one message; True when its readings were handed to the sink.

        `done` is called once the readings (or the dead letter) are durable.
        """
        self.stats.received += 1
        ident = parse_telemetry_topic(topic)
        tenant_id, device_id = ident if ident else (None, None)
        reason = None
        if ident is None:
            reason = "topic does not match sensormine/{tenant}/{device}/telemetry"
        elif not self.is_registered(tenant_id, device_id):  # type: ignore[arg-type]
            reason = f"unknown device {device_id!r} of tenant {tenant_id!r}"
        else:
            try:
                readings = parse_device_payload(payload, tenant_id, device_id, now_us())  # type: ignore[arg-type]
            except PayloadError as exc:
                reason = str(exc)
        if reason is not None:
            self.stats.rejected += 1
            self.sink.reject(SOURCE, topic, reason, payload, tenant_id, device_id, done=done)
            return False
        self.stats.accepted += 1
        self.sink.publish(tenant_id, device_id, SOURCE, readings, done=done)  # type: ignore[arg-type]
        return True


class MqttDaemon:
    """The always-on process: a paho client looping on its own thread, feeding MqttIngest."""

    def __init__(self, settings: Settings | None = None, sink: ReadingSink | None = None) -> None:
        self.settings = settings or get_settings()
        # Store-and-forward: while Kafka (or the database) is unreachable, readings wait in a disk buffer
        # named after the MQTT session, so a restarted daemon drains what its predecessor buffered.
        client_id = self.settings.mqtt_client_id or f"sensormine-ingest-{self.settings.env}"
        self._owns_sink = sink is None
        self.sink = sink or tracked(make_buffered_sink(self.settings, name=client_id), self.settings)
        # Serialises message handling with stop(): once stopping, a message is left unacknowledged
        # (the broker redelivers it to the next session) instead of being acknowledged too late.
        self._handing = threading.Lock()
        self._accepting = True
        self.directory = DeviceDirectory(lambda: connect(self.settings, role=INGEST))
        self.directory.refresh()
        self.ingest = MqttIngest(self.sink, self.directory.contains)
        self.subscribed = threading.Event()
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll_sink, name="sink-poller", daemon=True)
        self.client = make_ingest_client(self.settings)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode, properties: object
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        client.subscribe(TELEMETRY_SUBSCRIPTION, qos=1)  # re-subscribes after every reconnect
        log.info("subscribed to %s", TELEMETRY_SUBSCRIPTION)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        mid, qos = msg.mid, msg.qos
        with self._handing:
            if not self._accepting:
                return  # stopping: left unacknowledged, the broker redelivers it to the next session
            try:
                self.ingest.handle(msg.topic, bytes(msg.payload), done=lambda: client.ack(mid, qos))
            except Exception:  # a daemon must outlive any one message; unacknowledged, it comes back
                log.exception("failed to handle a message on %s", msg.topic)

    def _poll_sink(self) -> None:
        # Delivery confirmations (and so MQTT acknowledgements) must flow when no message arrives.
        while not self._stopping.is_set():
            self.sink.poll(0.1)

    def start(self, wait_s: float = 10.0) -> MqttDaemon:
        """Start looping in the background and wait for the subscription."""
        self.client.loop_start()
        self._poller.start()
        if not self.subscribed.wait(wait_s):
            raise RuntimeError("MQTT subscription was not acknowledged; is the broker up?")
        return self

    def stop(self) -> None:
        """Flush what was handed to the sink (acknowledging it), then disconnect; the session stays."""
        with self._handing:
            self._accepting = False
        self.sink.flush(30)
        self._stopping.set()
        self._poller.join(5)
        self.sink.flush(30)
        self.client.disconnect()
        self.client.loop_stop()
        if self._owns_sink:
            close = getattr(self.sink, "close", None)
            if close is not None:
                close()


def main() -> None:
    """Run the MQTT daemon until SIGTERM/SIGINT."""
    stop = stop_on_signals()
    daemon = MqttDaemon().start()

    def report() -> None:
        s = daemon.ingest.stats
        log.info("received=%d accepted=%d rejected=%d", s.received, s.accepted, s.rejected)

    report_until(stop, report)
    daemon.stop()


if __name__ == "__main__":
    main()
