"""Modbus TCP ingest daemon: polls every device that has a stored Modbus profile, hands readings to the sink.

One asyncio task per profile polls its device every `poll_interval_ms` with the batched reads of
`modbus_codec.plan_reads`, on one TCP connection per device. Every poll yields one reading per
point, all stamped with the poll's start time, published as one batch per device per poll.

Failures never stop the daemon and never drop a poll silently:
- a timeout, a lost connection or a garbled answer marks that request's points *and the rest of
  the poll's* bad (the device is not answering), and closes the connection: a late answer must
  not be taken for the next request's;
- a Modbus exception response marks that request's points bad; an "illegal data address/value"
  answer to a batched read splits it into one read per point from the next poll on, so one bad
  address no longer takes its neighbours down;
- an unreachable device is retried with exponential backoff (0.5 s doubling to 30 s); meanwhile
  every poll tick still yields its bad readings, so an outage is visible in the data;
- a float register holding NaN or ±inf is a bad reading too.

A bad reading (quality 2) carries the point's last good value seen by this process ("last value
held", as the OPC UA daemon does): the reading model's value is a non-null float64, and NaN cannot
travel through the JSON envelope. A point that has never been read has no value to hold: its bad
readings are not published, only counted (`DeviceStats.skipped`) and logged with the outage.

Profiles are re-read every `profile_refresh_s` (`ProfileWatcher`): an added profile starts a poller,
a changed one restarts it with the new register map, a removed one stops it; no restart needed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import psycopg
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from ingest_daemons.buffer import make_buffered_sink
from ingest_daemons.modbus_codec import CodecError, ReadRequest, plan_reads, split_request
from ingest_daemons.polling import Backoff, SinkStats, SinkWorker
from ingest_daemons.runner import report_until, stop_on_signals
from sensormine.clients.postgres import INGEST, connect
from sensormine.devices.profiles import ModbusProfile, ProfileChanges, ProfileWatcher, StoredProfile
from sensormine.devices.status import tracked
from sensormine.ingest.sinks import ReadingSink
from sensormine.reading import QUALITY_BAD, QUALITY_GOOD, Reading, now_us
from sensormine.settings import Settings, get_settings

log = logging.getLogger("sensormine.ingest.modbus")
SOURCE = "modbus"

PROFILE_REFRESH_S = 5.0
"""How often stored profiles are re-read."""
BACKOFF = Backoff(initial_s=0.5, max_s=30.0, jitter=0.0)
"""Between connection attempts to one device: 0.5 s doubling to 30 s."""
SINK_QUEUE_BATCHES = 1_000
"""Poll batches that may wait for the sink; past that, pollers wait (their polls overrun) rather than drop data."""
# Exception codes after which a batched read is split: the batch may span an address the device refuses.
_SPLIT_ON = frozenset({2, 3})
_READ_FN = {
    "holding": "read_holding_registers",
    "input": "read_input_registers",
    "coil": "read_coils",
    "discrete": "read_discrete_inputs",
}

DeviceKey = tuple[str, str]
Emit = Callable[[str, str, list[Reading]], Awaitable[None]]


@dataclass
class DeviceStats:
    """Counters of one device since the daemon started (kept across profile edits).

    Per poll, every point counts once in `good` (read), `bad` (not read, published holding its last
    good value) or `skipped` (not read, and never read yet: nothing published).
    """

    polls: int = 0
    good: int = 0
    bad: int = 0
    skipped: int = 0
    requests: int = 0
    registers: int = 0
    io_errors: int = 0
    exceptions: int = 0
    connects: int = 0
    connect_failures: int = 0
    overruns: int = 0
    last_error: str | None = None


@dataclass
class ModbusStats:
    """Daemon-wide counters; per device in `devices`, what was handed to the sink in `sink`.

    `sink.waits`: poll batches that found the sink queue full and waited for room (the sink is the
    bottleneck); `sink.dropped`: batches lost because the sink thread had died.
    """

    devices: dict[DeviceKey, DeviceStats] = field(default_factory=dict)
    sink: SinkStats = field(default_factory=SinkStats)
    profile_errors: int = 0

    def total(self) -> DeviceStats:
        """The sum of every device's counters."""
        out = DeviceStats()
        counters = [f.name for f in fields(DeviceStats) if f.type == "int"]
        for s in list(self.devices.values()):
            for name in counters:
                setattr(out, name, getattr(out, name) + getattr(s, name))
        return out


class Poll(NamedTuple):
    """One poll's outcome: its readings, how many of them are good, how many bad points had no value to hold."""

    readings: list[Reading]
    good: int
    skipped: int


class DevicePoller:
    """Polls one device according to its profile; runs as a task on the daemon's event loop."""

    def __init__(
        self,
        stored: StoredProfile,
        emit: Emit,
        stats: DeviceStats,
        last_good: dict[str, float],
    ) -> None:
        assert isinstance(stored.profile, ModbusProfile)
        self.tenant_id = stored.tenant_id
        self.device_id = stored.device_id
        self.profile: ModbusProfile = stored.profile
        self.revision = stored.revision
        self.plan: list[ReadRequest] = plan_reads(self.profile.points)
        self.timeout_s = self.profile.timeout_ms / 1000
        self._emit = emit
        self.stats = stats
        self.last_good = last_good
        self.client: AsyncModbusTcpClient | None = None
        self.stopping = False
        self.failures = 0
        self._next_connect = 0.0

    @property
    def name(self) -> str:
        """tenant/device, for logs."""
        return f"{self.tenant_id}/{self.device_id}"

    async def run(self) -> None:
        """Poll at the profile's interval until cancelled; a poll that overruns skips the missed ticks."""
        loop = asyncio.get_running_loop()
        interval = self.profile.poll_interval_ms / 1000
        next_tick = loop.time()
        try:
            while not self.stopping:
                poll = await self.poll_once(now_us())
                if self.stopping:
                    break
                if poll.readings:
                    await self._emit(self.tenant_id, self.device_id, poll.readings)
                # Counted once handed over, so the counters match what was published.
                self.stats.polls += 1
                self.stats.good += poll.good
                self.stats.bad += len(poll.readings) - poll.good
                self.stats.skipped += poll.skipped
                next_tick += interval
                now = loop.time()
                if now >= next_tick:
                    missed = int((now - next_tick) / interval) + 1
                    self.stats.overruns += missed
                    next_tick += missed * interval
                await asyncio.sleep(next_tick - now)
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection, if any."""
        if self.client is not None:
            self.client.close()
            self.client = None

    async def _connected_client(self) -> AsyncModbusTcpClient | None:
        if self.client is not None and self.client.connected:
            return self.client
        self.close()
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_connect:
            return None
        client = AsyncModbusTcpClient(
            self.profile.host,
            port=self.profile.port,
            timeout=self.timeout_s,
            retries=0,
            reconnect_delay=0,  # reconnection is ours, with our backoff
            name=self.name,
        )
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s + 1)
        except (TimeoutError, OSError, ModbusException) as exc:
            ok, self.stats.last_error = False, f"connect: {exc!r}"
        if not ok:
            client.close()
            self.stats.connect_failures += 1
            self._failed(f"cannot connect to {self.profile.host}:{self.profile.port}")
            return None
        self.stats.connects += 1
        self.client = client
        return client

    def _failed(self, error: str) -> None:
        if self.failures == 0:
            log.warning("%s: %s; readings are bad until it answers again", self.name, error)
        self.failures += 1
        self.stats.last_error = error
        self._next_connect = asyncio.get_running_loop().time() + BACKOFF.delay(self.failures - 1)

    async def _read(self, client: AsyncModbusTcpClient, request: ReadRequest) -> Any:
        fn = getattr(client, _READ_FN[request.table])
        # The client enforces the timeout itself; the outer bound only guards against a hung library call.
        return await asyncio.wait_for(
            fn(request.address, count=request.count, device_id=self.profile.unit_id), self.timeout_s + 1
        )

    async def poll_once(self, ts: int) -> Poll:
        """Read every point once; one reading per point, bad where the read failed."""
        plan = self.plan
        results: list[list[float] | None] = [None] * len(plan)
        split: list[tuple[int, list[ReadRequest]]] = []
        client = await self._connected_client()
        if client is not None:
            for i, request in enumerate(plan):
                self.stats.requests += 1
                try:
                    response = await self._read(client, request)
                except (TimeoutError, OSError, ModbusException) as exc:
                    # No (valid) answer: the device is gone or stuck; the rest of this poll would only
                    # wait for more timeouts. Reconnect, after backoff, on a later tick.
                    self.stats.io_errors += 1
                    self.close()
                    self._failed(f"{request.table} {request.address}+{request.count}: {exc!r}")
                    break
                if response.isError():
                    self.stats.exceptions += 1
                    code = getattr(response, "exception_code", None)
                    self.stats.last_error = f"{request.table} {request.address}+{request.count}: exception {code}"
                    if code in _SPLIT_ON and len(request.points) > 1:
                        log.warning("%s: %s; reading those points one by one", self.name, self.stats.last_error)
                        split.append((i, split_request(request)))
                    continue
                try:
                    results[i] = request.decode(response.bits if request.is_bits else response.registers)
                except CodecError as exc:
                    self.stats.io_errors += 1
                    self.stats.last_error = str(exc)
                    continue
                self.stats.registers += request.count
            else:
                if self.failures:
                    log.info("%s: answering again", self.name)
                self.failures = 0
        readings = self._readings(ts, plan, results)
        for i, parts in reversed(split):
            self.plan[i : i + 1] = parts
        return readings

    def _readings(self, ts: int, plan: list[ReadRequest], results: list[list[float] | None]) -> Poll:
        """Readings of one poll in plan order: good where a value was read (and is finite), else bad."""
        tenant, device, last_good = self.tenant_id, self.device_id, self.last_good
        ingest_ts = now_us()
        out: list[Reading] = []
        append = out.append
        new = tuple.__new__  # Reading's own __new__ is a Python-level wrapper; this is the hot loop
        good = skipped = 0
        for request, values in zip(plan, results, strict=True):
            metrics = request.metrics
            if values is not None and not (request.may_be_non_finite and not all(map(math.isfinite, values))):
                last_good.update(zip(metrics, values, strict=True))
                for metric, value in zip(metrics, values, strict=True):
                    append(new(Reading, (tenant, device, metric, ts, value, QUALITY_GOOD, ingest_ts)))
                good += len(metrics)
                continue
            for j, metric in enumerate(metrics):
                value = values[j] if values is not None else math.nan
                if math.isfinite(value):
                    last_good[metric] = value
                    append(new(Reading, (tenant, device, metric, ts, value, QUALITY_GOOD, ingest_ts)))
                    good += 1
                elif (held := last_good.get(metric)) is not None:
                    append(new(Reading, (tenant, device, metric, ts, held, QUALITY_BAD, ingest_ts)))
                else:
                    skipped += 1  # bad, and no value to hold yet
        return Poll(out, good, skipped)


class ModbusDaemon:
    """The always-on process: an event loop thread running one poller per profile, and a sink thread.

    `start()` returns once the stored profiles have been read once; `stop()` stops polling, hands every
    finished poll to the sink and flushes it. A poll cut short by `stop()` is not published.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        sink: ReadingSink | None = None,
        profile_refresh_s: float = PROFILE_REFRESH_S,
    ) -> None:
        # pymodbus logs every timeout at ERROR with a dump of the last frames; the pollers count each
        # failure and log an outage once, so its own logging would only flood the daemon's log.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.settings = settings or get_settings()
        # Store-and-forward buffer (while Kafka or the database is unreachable) and device status counts.
        self._owns_sink = sink is None
        self.sink = sink or tracked(
            make_buffered_sink(self.settings, name=f"modbus-{self.settings.env}"), self.settings
        )
        self.worker = SinkWorker(self.sink, SOURCE, name="modbus-sink", log=log, maxsize=SINK_QUEUE_BATCHES, idle_s=0.1)
        self.profile_refresh_s = profile_refresh_s
        self.watcher = ProfileWatcher("modbus")
        self.stats = ModbusStats(sink=self.worker.stats)
        self.pollers: dict[DeviceKey, tuple[DevicePoller, asyncio.Task[None]]] = {}
        self._last_good: dict[DeviceKey, dict[str, float]] = {}
        self._conn: psycopg.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop_thread = threading.Thread(target=self._run_loop, name="modbus-pollers", daemon=True)

    # --- lifecycle ---

    def start(self, wait_s: float = 30.0) -> ModbusDaemon:
        """Start polling in the background; returns once the profiles have been read."""
        self.worker.start()
        self._loop_thread.start()
        if not self._ready.wait(wait_s):
            raise RuntimeError("the Modbus daemon did not start in time")
        if self._error is not None:
            raise RuntimeError(f"the Modbus daemon failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Stop every poller, publish what was polled, flush the sink."""
        if self._loop is not None and self._stop is not None and self._loop_thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._loop_thread.join(30)
        self.worker.close(60)
        close = getattr(self.sink, "close", None)
        if self._owns_sink and close is not None:
            close()
        if self._conn is not None:
            self._conn.close()

    def device_stats(self, tenant_id: str, device_id: str) -> DeviceStats:
        """Counters of one device (zeros when it was never polled)."""
        return self.stats.devices.get((tenant_id, device_id), DeviceStats())

    def refresh_now(self, timeout: float = 30.0) -> ProfileChanges | None:
        """Re-read the profiles at once (from any thread) and apply the changes."""
        assert self._loop is not None, "start() first"
        return asyncio.run_coroutine_threadsafe(self.refresh_profiles(), self._loop).result(timeout)

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self._error = exc
            log.exception("the Modbus daemon's event loop failed")
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self._refresh_guarded()
            self._ready.set()
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), self.profile_refresh_s)
                except TimeoutError:
                    await self._refresh_guarded()
        finally:
            await asyncio.gather(*(self._stop_poller(key) for key in list(self.pollers)))

    async def _refresh_guarded(self) -> None:
        try:
            await self.refresh_profiles()
        except Exception:  # a bug applying a change must not stop the pollers already running
            self.stats.profile_errors += 1
            log.exception("applying Modbus profile changes failed")

    # --- profiles ---

    def _poll_watcher(self) -> ProfileChanges:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings, role=INGEST)
        return self.watcher.poll(self._conn)

    async def refresh_profiles(self) -> ProfileChanges | None:
        """Read the stored profiles and start, restart or stop pollers to match (None when the read failed)."""
        try:
            changes = await asyncio.to_thread(self._poll_watcher)
        except Exception as exc:  # the database away for a moment: keep polling with what we have
            self.stats.profile_errors += 1
            log.warning("could not read Modbus profiles (keeping the current ones): %s", exc)
            if self._conn is not None:
                self._conn.close()
            return None
        for key in changes.removed:
            log.info("%s/%s: profile removed, polling stops", *key)
            await self._stop_poller(key)
        for stored in changes.changed:
            key = (stored.tenant_id, stored.device_id)
            log.info("%s/%s: profile revision %d, polling restarts", *key, stored.revision)
            await self._stop_poller(key)
            self._start_poller(stored)
        for stored in changes.added:
            log.info("%s/%s: profile added, polling starts", stored.tenant_id, stored.device_id)
            self._start_poller(stored)
        return changes

    def _start_poller(self, stored: StoredProfile) -> None:
        key = (stored.tenant_id, stored.device_id)
        stats = self.stats.devices.setdefault(key, DeviceStats())
        poller = DevicePoller(stored, self.worker.publish_waiting, stats, self._last_good.setdefault(key, {}))
        task = asyncio.create_task(poller.run(), name=f"modbus {poller.name}")
        task.add_done_callback(self._poller_done)
        self.pollers[key] = (poller, task)

    def _poller_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a device failure (those are handled inside the poll): say so loudly.
            log.error("poller %s died", task.get_name(), exc_info=task.exception())

    async def _stop_poller(self, key: DeviceKey) -> None:
        entry = self.pollers.pop(key, None)
        if entry is None:
            return
        poller, task = entry
        poller.stopping = True
        # On Python 3.11, asyncio.wait_for (in pymodbus and here) can swallow a cancellation that
        # races with its awaited answer, which a busy poller meets often: cancel until it is done.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)


def main() -> None:
    """Run the Modbus daemon until SIGTERM/SIGINT."""
    stop = stop_on_signals()
    daemon = ModbusDaemon().start()

    def report() -> None:
        t = daemon.stats.total()
        log.info(
            "devices=%d polls=%d good=%d bad=%d io_errors=%d exceptions=%d published=%d sink_waits=%d",
            len(daemon.pollers),
            t.polls,
            t.good,
            t.bad,
            t.io_errors,
            t.exceptions,
            daemon.stats.sink.published_readings,
            daemon.stats.sink.waits,
        )

    report_until(stop, report)
    daemon.stop()


if __name__ == "__main__":
    main()
