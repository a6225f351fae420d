"""BufferedSink with a fake inner sink: pass-through, buffering in order, bounds and drop policies, restarts."""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ingest_daemons.buffer import BufferedSink, BufferInUse
from ingest_daemons.buffer.wiring import _ReportingKafkaSink
from sensormine.ingest.sinks import Done
from sensormine.reading import Reading
from sensormine.settings import Settings
from tests.conftest import REPO

T0 = 1_795_000_000_000_000  # a fixed instant (µs)


class FakeLink:
    """An inner sink with a link that is up or down. Deliveries are settled on `poll`, like Kafka's:
    confirmed while up; while down, failed (`done.failed`) or, with `silent`, left unanswered.
    With `raise_when_down`, publish raises ConnectionError instead (like the in-process path).
    What is delivered lands in hand-over order, as in a Kafka partition's log."""

    def __init__(self, *, raise_when_down: bool = False, silent: bool = False) -> None:
        self.up = True
        self.raise_when_down = raise_when_down
        self.silent = silent
        self.refuse: set[float] = set()  # reading values that raise ValueError (a non-link error)
        self._log: list[tuple[int, tuple]] = []
        self._pending: list[tuple[int, tuple, Done | None]] = []
        self._handed = 0
        self._lock = threading.Lock()

    def _hand(self, record: tuple, done: Done | None) -> None:
        if not self.up and self.raise_when_down:
            raise ConnectionError("link down")
        with self._lock:
            self._handed += 1
            self._pending.append((self._handed, record, done))

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        if any(r.value in self.refuse for r in readings):
            raise ValueError("cannot encode this")
        self._hand(("readings", tenant_id, device_id, tuple(r.value for r in readings)), done)

    def reject(
        self,
        source: str,
        origin: str,
        reason: str,
        payload: bytes,
        tenant_id: str | None = None,
        device_id: str | None = None,
        done: Done | None = None,
    ) -> None:
        self._hand(("reject", origin, reason, payload, tenant_id, device_id), done)

    def poll(self, timeout: float = 0.0) -> None:
        with self._lock:
            if not self.up and self.silent:
                work: list[tuple[int, tuple, Done | None]] = []
            else:
                work, self._pending = self._pending, []
            up = self.up
            if up:
                self._log += [(n, record) for n, record, _ in work]
        for _, _, done in work:
            if up:
                if done is not None:
                    done()
            else:
                done.failed("link down")  # type: ignore[union-attr]
        if not work and timeout:
            time.sleep(timeout)

    def flush(self, timeout: float = 10.0) -> int:
        self.poll()
        return len(self._pending)

    @property
    def delivered(self) -> list[tuple]:
        """Everything delivered, in the order it was handed over."""
        with self._lock:
            return [record for _, record in sorted(self._log)]

    def values(self, device: str) -> list[float]:
        """Values delivered for one device, in order."""
        return [v for rec in self.delivered if rec[0] == "readings" and rec[2] == device for v in rec[3]]


class Acks:
    """Counts `done` calls, like the MQTT daemon's acknowledgements."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


def reading(device: str, value: float) -> list[Reading]:
    return [Reading("acme", device, "temperature", T0 + int(value) * 1_000_000, value, 0, T0)]


def pump(sink: BufferedSink, until: Callable[[], bool], timeout: float = 10.0) -> None:
    """Serve delivery reports (as the daemon's poller thread does) until `until()` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out; stats {sink.stats}"
        sink.poll(0.01)


def rows_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM buffered").fetchone()[0]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "buffer.sqlite3"


def open_sink(link: FakeLink, path: Path, **kw) -> BufferedSink:
    kw.setdefault("retry_s", 0.05)
    return BufferedSink(link, path, **kw)  # type: ignore[arg-type]


def test_pass_through_acknowledges_on_delivery_and_never_touches_the_disk(path: Path) -> None:
    link, acks = FakeLink(), Acks()
    sink = open_sink(link, path)
    try:
        for i in range(100):
            sink.publish("acme", f"d{i % 3}", "test", reading(f"d{i % 3}", i), done=acks)
        assert acks.count == 0  # nothing is acknowledged before the inner confirms it
        assert sink.flush(5) == 0
        assert acks.count == 100
        assert sink.stats.passed == 100 and sink.stats.buffered == 0 and not sink.storing
    finally:
        sink.close()
    assert rows_on_disk(path) == 0


def test_outage_buffers_in_order_and_drains_when_the_link_returns(path: Path) -> None:
    link, acks = FakeLink(), Acks()
    sink = open_sink(link, path)
    try:
        for i in range(10):
            sink.publish("acme", f"d{i % 2}", "test", reading(f"d{i % 2}", i), done=acks)
        link.up = False  # the 10 above are still in the air: they fail on the next poll
        for i in range(10, 60):
            sink.publish("acme", f"d{i % 2}", "test", reading(f"d{i % 2}", i), done=acks)
        assert sink.flush(5) == 0
        assert acks.count == 60  # every message is durable (on disk) and acknowledged
        assert sink.storing and sink.buffered_messages == 60 and link.delivered == []
        assert sink.stats.outages == 1 and sink.stats.buffered == 60

        link.up = True
        sink.publish("acme", "d0", "test", reading("d0", 60), done=acks)  # newer: queues behind the buffer
        pump(sink, lambda: not sink.storing)
        assert link.values("d0") == [float(i) for i in range(0, 61, 2)]
        assert link.values("d1") == [float(i) for i in range(1, 60, 2)]
        assert sink.stats.drained == 61 and sink.stats.dropped == 0 and sink.stats.out_of_order == 0
        assert sink.buffered_messages == 0
    finally:
        sink.close()
    assert rows_on_disk(path) == 0


def test_backlog_drains_back_to_pass_through_under_a_live_feed_and_a_flapping_link(path: Path) -> None:
    link = FakeLink()
    sink = open_sink(link, path, drain_batch=50)
    stop = threading.Event()
    sent = 0

    def feed() -> None:  # a device that never pauses: the backlog never reaches zero by itself
        nonlocal sent
        while not stop.is_set():
            sink.publish("acme", f"d{sent % 3}", "test", reading(f"d{sent % 3}", sent))
            sent += 1
            time.sleep(0.0005)

    feeder = threading.Thread(target=feed)
    link.up = False
    feeder.start()
    try:
        pump(sink, lambda: sink.buffered_messages > 200)
        for _ in range(3):  # the link returns, blips while the backlog drains, and fails after the hand-over
            link.up = True
            drained = sink.stats.drained
            pump(sink, lambda n=drained: sink.stats.drained > n or not sink.storing, timeout=30)
            if sink.storing:  # down for a moment mid-drain: rows in flight fail and stay on disk
                link.up = False
                for _ in range(5):
                    sink.poll(0.002)
                link.up = True
            pump(sink, lambda: not sink.storing, timeout=30)  # back to pass-through while the feed goes on
            outages = sink.stats.outages
            link.up = False  # down again: it comes back only once the sink has noticed
            pump(sink, lambda n=outages: sink.stats.outages > n, timeout=30)
            buffered = sink.buffered_messages
            pump(sink, lambda n=buffered: sink.buffered_messages > n + 100, timeout=30)  # a backlog to drain
        link.up = True
        pump(sink, lambda: not sink.storing, timeout=30)
        assert feeder.is_alive()
    finally:
        stop.set()
        feeder.join()
    try:
        assert sink.flush(5) == 0
        pump(sink, lambda: not sink.storing)
        for d in range(3):  # each exactly once, in order
            assert link.values(f"d{d}") == [float(i) for i in range(d, sent, 3)]
        assert sink.stats.outages >= 4 and sink.stats.out_of_order == 0  # the first one, and one per round
    finally:
        sink.close()


def test_a_sink_that_raises_is_buffered_and_retried_with_a_probe(path: Path) -> None:
    link = FakeLink(raise_when_down=True)
    link.up = False
    sink = open_sink(link, path)
    try:
        for i in range(20):
            sink.publish("acme", "d0", "test", reading("d0", i))
        assert sink.flush(5) == 0 and sink.buffered_messages == 20
        time.sleep(0.3)  # several drain attempts fail while the link stays down
        assert sink.buffered_messages == 20 and link.delivered == []
        link.up = True
        pump(sink, lambda: not sink.storing)
        assert link.values("d0") == [float(i) for i in range(20)]
    finally:
        sink.close()


def test_rejects_are_buffered_with_their_original_bytes(path: Path) -> None:
    link = FakeLink()
    link.up = False
    sink = open_sink(link, path)
    try:
        sink.publish("acme", "d0", "mqtt", reading("d0", 1))
        sink.reject("mqtt", "sensormine/acme/d0/telemetry", "malformed JSON", b"{broken\xff", "acme", "d0")
        sink.publish("acme", "d0", "mqtt", reading("d0", 2))
        pump(sink, lambda: sink.flush(0) == 0 and sink.buffered_messages == 3)
        link.up = True
        pump(sink, lambda: not sink.storing)
    finally:
        sink.close()
    assert link.delivered == [
        ("readings", "acme", "d0", (1.0,)),
        ("reject", "sensormine/acme/d0/telemetry", "malformed JSON", b"{broken\xff", "acme", "d0"),
        ("readings", "acme", "d0", (2.0,)),
    ]


def test_buffer_survives_a_restart_and_new_data_queues_behind_it(path: Path) -> None:
    link = FakeLink(raise_when_down=True)
    link.up = False
    first = open_sink(link, path)
    for i in range(30):
        first.publish("acme", "d0", "test", reading("d0", i))
    first.close()
    assert rows_on_disk(path) == 30

    link2 = FakeLink()
    second = open_sink(link2, path, drain_batch=7)
    try:
        assert second.storing and second.buffered_messages == 30
        for i in range(30, 40):  # arrives while the old data drains: must not overtake it
            second.publish("acme", "d0", "test", reading("d0", i))
        pump(second, lambda: not second.storing)
        assert link2.values("d0") == [float(i) for i in range(40)]
        assert second.stats.drained == 40
    finally:
        second.close()


def test_flushed_data_survives_a_crash_and_the_file_is_exclusive(path: Path) -> None:
    child = f"""
import os, sys
from ingest_daemons.buffer import BufferedSink
from sensormine.reading import Reading
class Down:
    def publish(self, *a, done=None): raise ConnectionError("down")
    def reject(self, *a, done=None): raise ConnectionError("down")
    def poll(self, timeout=0.0): pass
    def flush(self, timeout=10.0): return 0
sink = BufferedSink(Down(), {str(path)!r})
for i in range(50):
    sink.publish("acme", "d0", "test", [Reading("acme", "d0", "t", {T0} + i, float(i), 0, {T0})])
assert sink.flush(10) == 0
print("flushed", flush=True)
sys.stdin.read()  # hold the buffer until killed
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", child], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
        with pytest.raises(BufferInUse, match=f"pid {proc.pid}"):
            open_sink(FakeLink(), path)
    finally:
        proc.send_signal(signal.SIGKILL)  # no close(): a crash
        proc.wait(10)
    link = FakeLink()
    sink = open_sink(link, path)
    try:
        pump(sink, lambda: not sink.storing)
        assert link.values("d0") == [float(i) for i in range(50)]
    finally:
        sink.close()


@pytest.mark.parametrize("drop", ["oldest", "newest"])
def test_full_buffer_drops_by_policy_counts_and_logs(path: Path, drop: str, caplog: pytest.LogCaptureFixture) -> None:
    values = range(10, 35)  # equal-sized messages (values of four characters)
    probe_link = FakeLink(raise_when_down=True)
    probe_link.up = False
    probe = open_sink(probe_link, path.with_name("probe.sqlite3"))
    probe.publish("acme", "d0", "test", reading("d0", 10))
    probe.flush(5)
    row_size = probe.buffered_bytes
    probe.close()

    link, acks = FakeLink(raise_when_down=True), Acks()
    link.up = False
    sink = open_sink(link, path, max_bytes=row_size * 10 + row_size // 2, drop=drop)
    try:
        with caplog.at_level(logging.WARNING, logger="sensormine.ingest.buffer"):
            for i in values:
                sink.publish("acme", "d0", "test", reading("d0", i), done=acks)
            assert sink.flush(5) == 0
        assert acks.count == 25  # dropped messages are acknowledged too: dropping is the decision
        assert sink.buffered_messages == 10 and sink.buffered_bytes == row_size * 10
        assert sink.stats.dropped == 15 and sink.stats.dropped_readings == 15
        assert any("is full" in r.getMessage() and drop in r.getMessage() for r in caplog.records)
        link.up = True
        pump(sink, lambda: not sink.storing)
    finally:
        sink.close()
    kept = list(values)[15:] if drop == "oldest" else list(values)[:10]
    assert link.values("d0") == [float(i) for i in kept]


def test_silent_inner_is_given_up_on_after_the_backstop(path: Path) -> None:
    link, acks = FakeLink(silent=True), Acks()
    sink = open_sink(link, path, delivery_timeout_s=0.3, retry_s=30)  # no drain attempt during the test
    try:
        link.up = False
        for i in range(5):
            sink.publish("acme", "d0", "test", reading("d0", i), done=acks)
        pump(sink, lambda: acks.count == 5, timeout=5)  # buffered once the backstop expired
        assert sink.storing and sink.stats.buffered == 5
        link.up = True  # the silent link answers after all: late confirmations, copies removed
        pump(sink, lambda: sink.stats.late == 5 and sink.buffered_messages == 0)
        assert sink.stats.drained == 0
    finally:
        sink.close()
    # The first attempt delivered them late; the buffered copies were removed before forwarding.
    assert link.values("d0") == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_newer_message_delivered_before_an_older_failed_one_is_counted(path: Path) -> None:
    link = FakeLink()
    sink = open_sink(link, path)
    try:
        sink.publish("acme", "d0", "test", reading("d0", 0))
        sink.publish("acme", "d0", "test", reading("d0", 1))
        first, second = link._pending
        link._pending = [second]
        first[2].failed("timed out")  # type: ignore[union-attr]  # a flapping link: 0 fails, 1 gets through
        pump(sink, lambda: not sink.storing)
        assert sink.stats.out_of_order == 1
    finally:
        sink.close()
    assert link.values("d0") == [1.0, 0.0]


def test_non_link_errors_reach_the_caller_and_poison_rows_go_to_the_dlq(path: Path) -> None:
    link = FakeLink(raise_when_down=True)
    link.refuse = {7.0}
    sink = open_sink(link, path)
    try:
        with pytest.raises(ValueError):  # pass-through: as without a buffer, the caller decides
            sink.publish("acme", "d0", "test", reading("d0", 7))
        assert sink.flush(1) == 0
        link.up = False
        for i in (6, 7, 8):
            sink.publish("acme", "d0", "test", reading("d0", i))
        assert sink.flush(5) == 0
        link.up = True
        pump(sink, lambda: not sink.storing)
        assert sink.stats.dead_lettered == 1
    finally:
        sink.close()
    assert link.values("d0") == [6.0, 8.0]
    dead = [rec for rec in link.delivered if rec[0] == "reject"]
    assert len(dead) == 1 and dead[0][1] == "store-and-forward" and "ValueError" in dead[0][2]


def test_reopening_in_the_same_process_takes_the_file_over(path: Path) -> None:
    link = FakeLink(raise_when_down=True)
    link.up = False
    first = open_sink(link, path)
    first.publish("acme", "d0", "test", reading("d0", 1))
    first.flush(5)
    link2 = FakeLink()
    second = open_sink(link2, path)  # like a daemon restarted in-process without close()
    try:
        with pytest.raises(RuntimeError, match="closed"):
            first.publish("acme", "d0", "test", reading("d0", 2))
        pump(second, lambda: not second.storing)
        assert link2.values("d0") == [1.0]
    finally:
        second.close()


def test_kafka_failures_reach_the_buffer_without_waiting_for_the_backstop(path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from sensormine.clients.kafka import make_producer

    settings = Settings(env="unit", kafka_bootstrap=f"127.0.0.1:{port}")
    producer = make_producer(settings, **{"message.timeout.ms": 300, "log_level": 0})
    sink = BufferedSink(_ReportingKafkaSink(settings, producer), path, delivery_timeout_s=60)
    acks = Acks()
    try:
        t0 = time.monotonic()
        sink.publish("acme", "d0", "test", reading("d0", 1), done=acks)
        pump(sink, lambda: acks.count == 1, timeout=10)
        assert time.monotonic() - t0 < 5 and sink.storing and sink.buffered_messages == 1
    finally:
        sink.close(timeout=2)


def test_rejects_bad_arguments(path: Path) -> None:
    with pytest.raises(ValueError):
        BufferedSink(FakeLink(), path, drop="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BufferedSink(FakeLink(), path, max_bytes=0)  # type: ignore[arg-type]
