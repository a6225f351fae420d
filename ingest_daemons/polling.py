"""What the device daemons (OPC UA, Modbus) share: reconnect backoff, and the thread that feeds their sink.

Both run their devices on an asyncio loop and hand readings to a sink that blocks (a DirectSink
writes to the database synchronously; the store-and-forward buffer may wait for the disk), so sink
calls run on a thread of their own, `SinkWorker`, in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sensormine.ingest.sinks import ReadingSink
from sensormine.reading import Reading


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between connection attempts, with jitter so devices do not retry in step."""

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0
        return min(self.max_s, base * spread)


SinkItem = tuple[Any, ...]
"""("publish", tenant_id, device_id, readings) or ("reject", origin, reason, payload, tenant_id, device_id)."""


@dataclass
class SinkStats:
    """Counters of a SinkWorker since it started."""

    published_batches: int = 0  # handed to the sink
    published_readings: int = 0
    rejected: int = 0  # dead letters handed to the sink
    durable: int = 0  # readings the sink has confirmed (in Kafka, committed, or in the disk buffer)
    errors: int = 0  # items the sink refused (raised)
    waits: int = 0  # batches that found a bounded queue full and waited for room (the sink is the bottleneck)
    dropped: int = 0  # batches lost because the worker thread had died


class SinkWorker:
    """Calls `sink` on its own thread, in arrival order, and serves its delivery callbacks while idle.

    `maxsize` bounds the queue (0: unbounded); `idle_s` is how long the thread waits for an item
    before it polls the sink; `source` is the readings' source; `log` gets the sink's refusals.
    """

    def __init__(
        self,
        sink: ReadingSink,
        source: str,
        *,
        name: str,
        log: logging.Logger,
        maxsize: int = 0,
        idle_s: float = 0.05,
    ) -> None:
        self.sink = sink
        self.source = source
        self.stats = SinkStats()
        self.idle_s = idle_s
        self._log = log
        self._queue: queue.Queue[SinkItem | None] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def put(self, item: SinkItem) -> None:
        """Queue an item (blocks while a bounded queue is full)."""
        self._queue.put(item)

    async def publish_waiting(self, tenant_id: str, device_id: str, readings: list[Reading]) -> None:
        """Queue a batch from the event loop; while the queue is full, wait for room (without blocking the
        loop) rather than drop it, unless the thread has died and nobody will ever take it."""
        item = ("publish", tenant_id, device_id, readings)
        waited = False
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self.stats.dropped += 1
                    return
                if not waited:
                    waited = True
                    self.stats.waits += 1
                await asyncio.sleep(0.005)

    def close(self, timeout: float = 30.0) -> None:
        """Hand over everything queued, then wait until the sink has made it durable."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self.sink.flush(timeout)

    def _confirmed(self, n: int) -> Callable[[], None]:
        def done() -> None:
            self.stats.durable += n

        return done

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                self.sink.poll(0)
                continue
            if item is None:
                return
            try:
                self._hand(item)
            except Exception:  # the sink logs its own failures; the daemon goes on
                self.stats.errors += 1
                self._log.exception("could not hand %s to the sink", _describe(item))

    def _hand(self, item: SinkItem) -> None:
        if item[0] == "publish":
            _, tenant_id, device_id, readings = item
            self.sink.publish(tenant_id, device_id, self.source, readings, done=self._confirmed(len(readings)))
            self.stats.published_batches += 1
            self.stats.published_readings += len(readings)
        else:
            _, origin, reason, payload, tenant_id, device_id = item
            self.sink.reject(self.source, origin, reason, payload, tenant_id, device_id)
            self.stats.rejected += 1


def _describe(item: SinkItem) -> str:
    """What an item carries, for a log line: "3 readings of acme/m-1", "a dead letter of acme/m-1"."""
    if item[0] == "publish":
        return f"{len(item[3])} readings of {item[1]}/{item[2]}"
    return f"a dead letter of {item[4]}/{item[5]}"
