"""What the device daemons share: reconnect backoff, and the sink worker thread."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

from ingest_daemons.polling import Backoff, SinkWorker
from sensormine.ingest.sinks import Done
from sensormine.reading import Reading

log = logging.getLogger("test.polling")


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    exact = Backoff(initial_s=1, max_s=30, jitter=0)
    assert [exact.delay(i) for i in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert exact.delay(10_000) == 30
    jittered = Backoff(initial_s=1, max_s=30, jitter=0.2)
    rng = random.Random(1)
    delays = [jittered.delay(3, rng) for _ in range(200)]
    assert all(6.4 <= d <= 9.6 for d in delays) and len(set(delays)) > 100
    assert all(jittered.delay(20, rng) <= 30 for _ in range(50))


class RecordingSink:
    """Records what it is handed, confirms on `poll`, and refuses readings of the device "bad"."""

    def __init__(self) -> None:
        self.got: list[tuple] = []
        self.pending: list[Done] = []
        self.release = threading.Event()  # publish blocks until set (a sink that lags)
        self.release.set()
        self.lock = threading.Lock()

    def publish(
        self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Done | None = None
    ) -> None:
        self.release.wait(10)
        if device_id == "bad":
            raise ValueError("refused")
        with self.lock:
            self.got.append(("publish", source, device_id, [r.value for r in readings]))
            if done is not None:
                self.pending.append(done)

    def reject(self, source: str, *args: object, done: Done | None = None) -> None:
        with self.lock:
            self.got.append(("reject", source, *args))

    def poll(self, timeout: float = 0.0) -> None:
        with self.lock:
            work, self.pending = self.pending, []
        for done in work:
            done()

    def flush(self, timeout: float = 10.0) -> int:
        self.poll()
        return 0


def readings(device: str, *values: float) -> list[Reading]:
    return [Reading("acme", device, "t", 1_795_000_000_000_000, v, 0, 0) for v in values]


def test_the_worker_hands_items_over_in_order_and_counts_what_became_durable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = RecordingSink()
    worker = SinkWorker(sink, "test", name="test-sink", log=log)  # type: ignore[arg-type]
    worker.start()
    worker.put(("publish", "acme", "d1", readings("d1", 1.0, 2.0)))
    worker.put(("reject", "opc.tcp://x#n", "not numeric", b"x", "acme", "d1"))
    with caplog.at_level(logging.ERROR, logger="test.polling"):
        worker.put(("publish", "acme", "bad", readings("bad", 9.0)))
        worker.put(("publish", "acme", "d2", readings("d2", 3.0)))
        worker.close()
    assert sink.got == [
        ("publish", "test", "d1", [1.0, 2.0]),
        ("reject", "test", "opc.tcp://x#n", "not numeric", b"x", "acme", "d1"),
        ("publish", "test", "d2", [3.0]),
    ]
    s = worker.stats
    assert (s.published_batches, s.published_readings, s.rejected, s.errors, s.durable) == (2, 3, 1, 1, 3)
    assert any("could not hand 1 readings of acme/bad to the sink" in r.getMessage() for r in caplog.records)


def test_a_full_queue_makes_the_event_loop_wait_and_a_dead_worker_drops() -> None:
    sink = RecordingSink()
    sink.release.clear()  # the sink lags: the worker holds one batch, the queue fills up
    worker = SinkWorker(sink, "test", name="test-sink", log=log, maxsize=1)  # type: ignore[arg-type]
    worker.start()

    async def feed() -> None:
        for v in range(4):
            await worker.publish_waiting("acme", "d1", readings("d1", float(v)))

    loop = asyncio.new_event_loop()
    try:
        fed = loop.create_task(feed())
        deadline = time.monotonic() + 10
        while worker.stats.waits == 0:  # the loop runs on while the feed waits for room
            assert time.monotonic() < deadline
            loop.run_until_complete(asyncio.sleep(0.01))
        sink.release.set()
        loop.run_until_complete(asyncio.wait_for(fed, 10))
        worker.close()
        assert [g[3] for g in sink.got] == [[0.0], [1.0], [2.0], [3.0]]
        assert worker.stats.dropped == 0

        dead = SinkWorker(sink, "test", name="never-started", log=log, maxsize=1)  # type: ignore[arg-type]
        loop.run_until_complete(dead.publish_waiting("acme", "d1", readings("d1", 4.0)))  # fills the queue
        loop.run_until_complete(dead.publish_waiting("acme", "d1", readings("d1", 5.0)))  # nobody takes it
        assert (dead.stats.waits, dead.stats.dropped) == (0, 1)
    finally:
        loop.close()
