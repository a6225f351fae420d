"""Store-and-forward through real services: a private Kafka broker that the test stops and starts,
the session's Mosquitto, and PostgreSQL behind a TCP proxy that the test cuts."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ingest_daemons.buffer import BufferedSink
from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.mqtt import MqttDaemon
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.mqtt import make_client, telemetry_topic
from sensormine.services import process
from sensormine.services.base import Record
from sensormine.services.kafka import Kafka
from sensormine.settings import Settings
from sensormine.telemetry.payload import decode_envelope
from tests.factories import DAY_US, make_tenant

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

DEVICES = [f"d{i}" for i in range(4)]
MALFORMED_EVERY = 250  # message k with k % MALFORMED_EVERY == 7 is broken JSON: a dead letter


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class PrivateKafka:
    """A Kafka broker of this test only, in its own state dir, restartable on the same port."""

    def __init__(self, state: Path) -> None:
        self.service = Kafka(state)
        self.record: Record = self.service.launch(None, log.info)
        self.running = True

    @property
    def bootstrap(self) -> str:
        return self.record.url

    def stop(self) -> None:
        if self.running:
            self.service.stop(self.record)
            self.running = False

    def discard(self) -> None:
        """Stop it for good, without the controlled shutdown (its state is thrown away): seconds, not 30."""
        if self.running:
            process.terminate(self.record.pid, self.record.start_time, grace=2.0)
            self.running = False

    def start(self) -> None:
        port = self.record.port
        self.record = self.service.launch(self.record, log.info)  # reuses the port when it is free
        assert self.record.port == port, "the broker came back on another port"
        self.running = True


@pytest.fixture
def private_kafka(tmp_path: Path) -> Iterator[PrivateKafka]:
    kafka = PrivateKafka(tmp_path / "kafka-state")
    try:
        yield kafka
    finally:
        kafka.discard()


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Message]:
    """Every message of a topic, partition by partition in offset order, up to the high watermarks
    (assigned directly: no consumer group, so a broker still loading its coordinator does not matter)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        got: dict[int, list[Message]] = {p: [] for p in partitions}
        todo = {p for p in partitions if ends[p] > 0}
        deadline = time.monotonic() + timeout
        while todo:
            assert time.monotonic() < deadline, f"{topic}: partitions {sorted(todo)} not read to their end"
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    got[msg.partition()].append(msg)
                    if msg.offset() + 1 >= ends[msg.partition()]:
                        todo.discard(msg.partition())
    finally:
        consumer.close()
    return [m for p in partitions for m in got[p]]


def seqs_in(bootstrap: str, topic: str) -> set[int]:
    """The seq values of every reading in a telemetry topic so far."""
    return {int(r.value) for msg in read_topic(bootstrap, topic) for r in decode_envelope(msg.value())}


class TcpProxy:
    """Forwards a loopback port to PostgreSQL. `cut()` makes the database unreachable as a network
    failure or a stopped server would: open connections are reset and new ones refused.
    `restore()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        if self._listener is not None:
            with_reset(self._listener)  # shutdown wakes the blocked accept(); close alone would leave it listening
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with_reset(c)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with_reset(s)


def with_reset(s: socket.socket) -> None:
    """Close a socket with a TCP reset, as a dead peer or a failed network looks to the other side."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.shutdown(socket.SHUT_RDWR)  # also wakes the pump thread blocked in recv (close alone would not)
    except OSError:
        pass
    s.close()


class Publisher:
    """Devices publishing numbered readings at QoS 1, round-robin, from a background thread.

    Message k carries reading {"seq": k} of device DEVICES[k % 4] at DAY + k seconds; every
    MALFORMED_EVERY-th message (offset 7) is broken JSON instead.
    """

    def __init__(self, settings: Settings, rate_hz: float) -> None:
        self.client = make_client("sf-devices", settings)
        self.client.loop_start()
        self.interval = 1.0 / rate_hz
        self.sent = 0
        self._infos: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def message(k: int) -> tuple[str, bytes]:
        topic = telemetry_topic("acme", DEVICES[k % len(DEVICES)])
        if k % MALFORMED_EVERY == 7:
            return topic, b'{"ts": broken'
        return topic, orjson.dumps({"ts": DAY_US // 1000 + k * 1000, "values": {"seq": k}})

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            topic, payload = self.message(self.sent)
            self._infos.append(self.client.publish(topic, payload, qos=1))
            self.sent += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def wait_sent(self, n: int, timeout: float = 30.0) -> None:
        wait_until(lambda: self.sent >= n, timeout, f"{n} messages published")

    def stop(self) -> int:
        """Stop publishing once the broker has acknowledged everything; returns the messages sent."""
        self._stop.set()
        self._thread.join(10)
        for info in self._infos:
            info.wait_for_publish(30)
        self.client.loop_stop()
        self.client.disconnect()
        return self.sent

    def expected(self) -> tuple[dict[str, list[int]], int]:
        """Per device, the seq values sent in order; and how many messages were malformed."""
        per_device: dict[str, list[int]] = {d: [] for d in DEVICES}
        malformed = 0
        for k in range(self.sent):
            if k % MALFORMED_EVERY == 7:
                malformed += 1
            else:
                per_device[DEVICES[k % len(DEVICES)]].append(k)
        return per_device, malformed


def buffered_sink(daemon: MqttDaemon) -> BufferedSink:
    # The daemon's own sink: device-status counting around the store-and-forward buffer.
    sink = getattr(daemon.sink, "inner", daemon.sink)
    assert isinstance(sink, BufferedSink), "MqttDaemon should build a store-and-forward sink"
    return sink


def restart(daemon: MqttDaemon, settings: Settings) -> MqttDaemon:
    """Stop the daemon (flushing to the buffer, acknowledging), release its buffer, start a new one.

    The devices publish on throughout, also while `stop()` runs: the daemon stops handing messages
    to its sink before its last flush, so nothing it has not acknowledged is buffered (the broker
    gives the rest to the next daemon), and a message is never both buffered and redelivered. They
    publish on while no daemon runs (the broker queues for the session) and while the new one starts.
    """
    daemon.stop()
    buffered_sink(daemon).close()
    return MqttDaemon(settings).start()


def test_kafka_outage_with_a_daemon_restart_delivers_every_reading_once_in_order(
    settings: Settings, conn: psycopg.Connection, private_kafka: PrivateKafka
) -> None:
    s = settings.model_copy(update={"kafka_bootstrap": private_kafka.bootstrap})
    make_tenant(conn, "acme", DEVICES)
    topic = s.telemetry_topic("acme")
    ensure_topics([topic, s.dlq_topic], settings=s)
    daemon = MqttDaemon(s).start()
    devices = Publisher(s, rate_hz=400).start()
    try:
        devices.wait_sent(400)  # Kafka is up: straight through
        wait_until(lambda: buffered_sink(daemon).stats.passed >= 300, 20, "pass-through deliveries")
        assert buffered_sink(daemon).stats.buffered == 0

        private_kafka.stop()
        outage_from = devices.sent
        devices.wait_sent(outage_from + 1200)
        first = buffered_sink(daemon)
        assert first.storing and first.stats.buffered > 0

        daemon = restart(daemon, s)  # during the outage, while the devices keep publishing
        second = buffered_sink(daemon)
        assert second.storing and second.buffered_messages >= first.buffered_messages > 0
        devices.wait_sent(devices.sent + 1200)

        private_kafka.start()
        wait_until(lambda: not second.storing, 60, "the buffer to drain")
        devices.wait_sent(devices.sent + 400)  # the link is back: straight through again
    finally:
        sent = devices.stop()
        # Messages the broker acknowledged but has not delivered yet stay queued in the daemon's session
        # (not lost, delivered to its next run). The broker delivers a session's messages in order, so
        # once the last valid one is in Kafka, this run has had every one (a restart makes the
        # daemon's own counters start again, so they cannot tell).
        last = max(k for k in range(sent) if k % MALFORMED_EVERY != 7)
        wait_until(lambda: last in seqs_in(private_kafka.bootstrap, topic), 60, f"reading {last} in Kafka")
        daemon.stop()
        buffered_sink(daemon).close()

    per_device, malformed = devices.expected()
    n = sum(len(v) for v in per_device.values())
    assert n + malformed == sent and n > 3000
    arrived: dict[str, list[int]] = {d: [] for d in DEVICES}
    for msg in read_topic(private_kafka.bootstrap, topic):
        for r in decode_envelope(msg.value()):
            arrived[r.device_id].append(int(r.value))
    for device in DEVICES:
        # In Kafka: every reading, in publishing order. A message in flight at the moment Kafka
        # went down may have been written although its delivery failed; the buffer then sends it
        # again (at least once at that edge), so a repeat may follow it, never a reordering.
        first_seen = list(dict.fromkeys(arrived[device]))
        assert first_seen == per_device[device], device
        assert len(arrived[device]) - len(first_seen) <= 20, f"{device}: more repeats than one in-flight batch"

    # In the hot store: exactly N readings per device, none doubled (the consumer dedupes).
    consumer = HotStoreConsumer(s)
    try:
        consumer.run(threading.Event(), idle_exit_s=3.0)
    finally:
        consumer.close()
    stored: dict[str, list[int]] = {d: [] for d in DEVICES}
    for device, value in conn.execute("SELECT device_id, value FROM telemetry ORDER BY device_id, ts").fetchall():
        stored[device].append(int(value))
    for device in DEVICES:  # exactly N readings, per device in publishing (= timestamp) order, none doubled
        assert stored[device] == per_device[device], device
    dead = read_topic(private_kafka.bootstrap, s.dlq_topic)
    # Every malformed message is a dead letter; like a reading, one in flight when Kafka went down may be
    # written twice (at least once at that edge; the letters are identical, so repeats cannot be told apart).
    assert malformed <= len(dead) <= malformed + 20, (len(dead), malformed)
    assert all(m.value() == b'{"ts": broken' for m in dead)
    assert first.stats.outages == 1 and first.stats.dropped == second.stats.dropped == 0
    assert second.stats.drained >= second.stats.buffered > 0
    assert first.stats.out_of_order == second.stats.out_of_order == 0


def test_database_outage_without_kafka_buffers_and_drains_in_order(
    settings: Settings, conn: psycopg.Connection
) -> None:
    url = conninfo_to_dict(settings.database_url or "")
    proxy = TcpProxy((str(url.get("host", "127.0.0.1")), int(url.get("port", 5432))))
    proxied = make_conninfo(settings.database_url or "", host="127.0.0.1", port=proxy.port)
    direct = settings.model_copy(update={"kafka_bootstrap": None, "database_url": proxied})
    make_tenant(conn, "acme", DEVICES)
    conn.commit()
    daemon = MqttDaemon(direct).start()
    sink = buffered_sink(daemon)
    devices = Publisher(direct, rate_hz=300).start()
    try:
        devices.wait_sent(300)
        wait_until(lambda: sink.stats.passed >= 250, 20, "pass-through writes")

        proxy.cut()  # the database is unreachable for the daemon (the test's own connection is direct)
        devices.wait_sent(devices.sent + 1200)
        assert sink.storing and sink.stats.buffered > 0
        rows_during_outage = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        conn.commit()

        proxy.restore()
        wait_until(lambda: not sink.storing, 60, "the buffer to drain")
        devices.wait_sent(devices.sent + 300)
    finally:
        sent = devices.stop()
        # Messages the broker acknowledged but has not delivered yet stay queued in the daemon's session
        # (not lost, delivered to its next run): wait for them so this run's count is complete.
        wait_until(lambda: daemon.ingest.stats.received >= sent, 30, "the daemon to receive every message")
        daemon.stop()
        sink.close()
        proxy.cut()

    per_device, malformed = devices.expected()
    assert sum(len(v) for v in per_device.values()) + malformed == sent
    assert rows_during_outage < sum(len(v) for v in per_device.values()) - 1000  # the outage held data back
    # Each message is one transaction, so transaction ids give the order rows were written in.
    rows = conn.execute("SELECT device_id, value FROM telemetry ORDER BY xmin::text::bigint, device_id").fetchall()
    arrived: dict[str, list[int]] = {d: [] for d in DEVICES}
    for device, value in rows:
        arrived[device].append(int(value))
    for device in DEVICES:
        assert arrived[device] == per_device[device], device
    dead = conn.execute("SELECT payload FROM dead_letters").fetchall()
    assert len(dead) == malformed and all(bytes(p) == b'{"ts": broken' for (p,) in dead)
    assert sink.stats.drained == sink.stats.buffered > 0 and sink.stats.dropped == 0
