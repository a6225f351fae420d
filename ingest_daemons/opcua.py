"""OPC UA ingest daemon: subscribes to the nodes of every stored OPC UA device profile.

For each profile (`sensormine.devices.profiles.OpcUaProfile`) the daemon keeps one client connection with
one subscription at the profile's publishing interval and one monitored item per node (its
sampling interval, and an absolute-deadband `DataChangeFilter` when the node has a deadband). It
never polls: values arrive as data-change notifications. Each publish response becomes one batch
of readings per device, handed to the sink (Kafka, or the hot store in-process).

- Quality comes from the OPC UA StatusCode's severity bits: Good -> QUALITY_GOOD, Uncertain ->
  QUALITY_UNCERTAIN, Bad -> QUALITY_BAD.
- A Bad status carries no usable value (the spec says to ignore it; servers send none). The
  reading then holds the node's last known value with quality bad, so the outage is on record
  and aggregates over good data are unaffected; before any value was seen it is dropped, counted.
- Non-numeric values (strings, arrays, ...) and non-finite numbers go to the dead-letter queue
  with a reason. Booleans become 1.0/0.0, like the MQTT path.
- When a connection drops (or its subscription goes quiet) the device reconnects with
  exponential backoff and re-creates its subscription; every device runs in its own task, so
  one failing device never stops the others.
- Profiles are re-read every few seconds (`ProfileWatcher`): an added profile connects, a
  removed one disconnects, a changed one re-subscribes on the same connection (nodes or
  publishing interval changed) or reconnects (endpoint, security or credentials changed).

The asyncio loop runs on its own thread; sink calls run on another (a DirectSink writes to the
database synchronously and must not stall the OPC UA traffic). See docs/opcua.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from asyncua import Client, ua
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies, uacrypto
from cryptography import x509

from ingest_daemons.buffer import make_buffered_sink
from ingest_daemons.polling import Backoff, SinkItem, SinkWorker
from ingest_daemons.runner import report_until, stop_on_signals
from sensormine.clients.postgres import INGEST, connect
from sensormine.devices.profiles import OpcUaNode, OpcUaProfile, ProfileChanges, ProfileWatcher, StoredProfile
from sensormine.devices.status import tracked
from sensormine.ingest.sinks import ReadingSink
from sensormine.reading import (
    QUALITY_BAD,
    QUALITY_GOOD,
    QUALITY_UNCERTAIN,
    Reading,
    datetime_to_us,
    now_us,
)
from sensormine.settings import Settings, get_settings

log = logging.getLogger("sensormine.ingest.opcua")
SOURCE = "opcua"
_MIN_TS = datetime(2000, 1, 1)
_MAX_TS = datetime(2100, 1, 1)


# --- conversion: pure functions -------------------------------------------------------------------


def quality_of(status: int) -> int:
    """The Reading quality of an OPC UA StatusCode value, from its two severity bits.

    00 Good, 01 Uncertain, 10 Bad; 11 is reserved and must be treated as Bad (Part 4, 7.39).
    """
    severity = (status >> 30) & 0b11
    if severity == 0:
        return QUALITY_GOOD
    if severity == 1:
        return QUALITY_UNCERTAIN
    return QUALITY_BAD


class NotNumeric(ValueError):
    """A value that cannot be a reading; its message is the dead-letter reason."""


def numeric_value(raw: object) -> float:
    """A finite float from an OPC UA scalar (Boolean, integer or floating types); NotNumeric otherwise."""
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int):
        try:
            return float(raw)
        except OverflowError:
            raise NotNumeric("integer too large for float64") from None
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise NotNumeric(f"value is not finite ({raw})")
        return float(raw)  # a plain float, not asyncua's Float/Double subclass
    if isinstance(raw, list | tuple):
        raise NotNumeric("array values are not supported")
    raise NotNumeric(f"non-numeric value of type {type(raw).__name__}")


def timestamp_us(dv: ua.DataValue, fallback_us: int) -> int:
    """The source timestamp of a value, else its server timestamp, else `fallback_us` (epoch µs).

    A timestamp outside 2000..2100 (an unset OPC UA DateTime decodes as 1601) counts as missing.
    """
    for ts in (dv.SourceTimestamp, dv.ServerTimestamp):
        if ts is not None and _MIN_TS <= ts.replace(tzinfo=None) < _MAX_TS:
            return datetime_to_us(ts)
    return fallback_us


@dataclass(frozen=True)
class Rejection:
    """A data change that cannot become a reading."""

    reason: str
    value: object


def to_point(dv: ua.DataValue, last_value: float | None, now: int) -> tuple[int, float, int] | Rejection | None:
    """(ts µs, value, quality) for one data change, a Rejection, or None when there is nothing to record.

    A Bad status, or an Uncertain one without a value, holds `last_value` (the node's last known
    value); with no last value, or a Good status without a value, there is nothing to record.
    """
    status = dv.StatusCode.value if dv.StatusCode is not None else 0
    quality = quality_of(status)
    raw = dv.Value.Value if dv.Value is not None else None
    ts = timestamp_us(dv, now)
    if quality == QUALITY_BAD or raw is None:
        if quality == QUALITY_GOOD or last_value is None:
            return None
        return ts, last_value, quality
    try:
        return ts, numeric_value(raw), quality
    except NotNumeric as exc:
        return Rejection(str(exc), raw)


def status_name(status: int) -> str:
    """The symbolic name of a StatusCode value (hex when unknown)."""
    try:
        return ua.StatusCode(ua.UInt32(status)).name
    except Exception:
        return f"0x{status:08X}"


def queue_size(publishing_ms: float, sampling_ms: float) -> int:
    """Server-side queue per monitored item: room for two publishing intervals of samples, 10..1000."""
    if sampling_ms <= 0:  # "as fast as the server can": leave plenty of room
        return 100
    return min(1000, max(10, 2 * math.ceil(publishing_ms / sampling_ms)))


# --- options ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpcUaOptions:
    """Knobs of the daemon (the command line sets them; tests shorten them)."""

    profile_poll_s: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    request_timeout_s: float = 10.0  # each OPC UA request (connect, create subscription, ...)
    watchdog_s: float = 1.0  # how often asyncua probes an idle connection
    keepalive_s: float = 5.0  # the server sends a keep-alive after this long without data
    stale_after_keepalives: float = 3.0  # no publish response for this many keep-alives: reconnect
    max_readings_per_message: int = 5_000


# --- one device ---------------------------------------------------------------------------------


@dataclass
class DeviceStatus:
    """What one device connection has been doing (counters since the daemon started)."""

    state: str = "starting"  # starting, connecting, connected, backoff, stopped
    connects: int = 0
    subscribes: int = 0  # a changed profile re-subscribes on the same connection
    failures: int = 0
    last_error: str | None = None
    notifications: int = 0
    readings: int = 0
    rejected: int = 0
    empty: int = 0  # notifications with nothing to record (Bad before any value was seen)
    node_errors: dict[str, str] = field(default_factory=dict)  # metric -> why its monitored item failed


class _DeviceSubscription(Subscription):
    """A subscription that hands each publish response over whole, instead of event by event."""

    def __init__(
        self,
        session: Any,
        params: ua.CreateSubscriptionParameters,
        on_publish: Callable[[ua.PublishResult], None],
    ) -> None:
        super().__init__(session, params, handler=None, queue_maxsize=1)
        self._on_publish = on_publish
        self.last_publish = time.monotonic()
        self.keepalive_s = 0.0  # as revised by the server

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish = self.last_publish_at = time.monotonic()
        self._on_publish(publish_result)


Emit = Callable[[SinkItem], None]


def _connection_key(profile: OpcUaProfile) -> dict[str, Any]:
    return profile.model_dump(exclude={"nodes", "publishing_interval_ms"})


async def _certificate_uri(path: str) -> str | None:
    cert = await uacrypto.load_certificate(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


class DeviceSession:
    """One device: connect, subscribe, convert notifications, reconnect with backoff; an asyncio task."""

    def __init__(self, stored: StoredProfile, options: OpcUaOptions, emit: Emit) -> None:
        self.tenant_id = stored.tenant_id
        self.device_id = stored.device_id
        assert isinstance(stored.profile, OpcUaProfile)
        self.profile: OpcUaProfile = stored.profile
        self.revision = stored.revision
        self.options = options
        self.status = DeviceStatus()
        self._emit = emit
        self._last_values: dict[str, float] = {}  # metric -> last numeric value, kept across reconnects
        self._handles: dict[int, OpcUaNode] = {}
        self._wake = asyncio.Event()
        self._lost: str | None = None
        self._pending: StoredProfile | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    @property
    def key(self) -> tuple[str, str]:
        """(tenant, device)."""
        return (self.tenant_id, self.device_id)

    def start(self) -> None:
        """Begin connecting in the background."""
        self._task = asyncio.create_task(self._run(), name=f"opcua:{self.tenant_id}/{self.device_id}")

    def update(self, stored: StoredProfile) -> None:
        """Take a changed profile: re-subscribe, or reconnect when how to connect changed."""
        self._pending = stored
        self._wake.set()

    async def close(self) -> None:
        """Disconnect and end the task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.status.state = "stopped"

    # the connection loop

    async def _run(self) -> None:
        attempt = 0
        while True:
            client: Client | None = None
            reconnect_now = False
            try:
                self.status.state = "connecting"
                self._lost = None
                client = await self._connect()
                self.status.connects += 1
                while True:
                    sub = await self._subscribe(client)
                    self.status.state = "connected"
                    self.status.subscribes += 1
                    attempt = 0
                    log.info(
                        "%s/%s: subscribed to %d nodes at %s",
                        self.tenant_id,
                        self.device_id,
                        len(self._handles),
                        self.profile.endpoint,
                    )
                    outcome = await self._watch(sub)
                    if outcome == "lost":
                        break
                    pending, self._pending = self._pending, None
                    assert pending is not None
                    if not self._adopt(pending):
                        reconnect_now = True
                        break
                    log.info("%s/%s: profile changed, re-subscribing", self.tenant_id, self.device_id)
                    try:
                        await asyncio.wait_for(sub.delete(), self.options.request_timeout_s)
                    except Exception as exc:  # the new subscription replaces it either way
                        log.debug("deleting the old subscription failed: %s", exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.status.failures += 1
                self.status.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                if client is not None:
                    await self._disconnect(client)
            if self._lost is not None:
                self.status.last_error = self._lost
            if self._pending is not None:  # changed while connecting or waiting
                self._adopt(self._pending)
                self._pending = None
                reconnect_now = True
            if reconnect_now:
                continue
            delay = self.options.backoff.delay(attempt, self._rng)
            attempt += 1
            log.warning(
                "%s/%s: %s: %s; retrying in %.1f s",
                self.tenant_id,
                self.device_id,
                self.profile.endpoint,
                self.status.last_error,
                delay,
            )
            self.status.state = "backoff"
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # a profile change ends the wait early
                await asyncio.wait_for(self._wake.wait(), delay)

    def _adopt(self, stored: StoredProfile) -> bool:
        """Switch to a changed profile; True when it connects the same way (a re-subscribe will do)."""
        assert isinstance(stored.profile, OpcUaProfile)
        same = _connection_key(stored.profile) == _connection_key(self.profile)
        self.profile, self.revision = stored.profile, stored.revision
        return same

    async def _connect(self) -> Client:
        p, opts = self.profile, self.options
        client = Client(p.endpoint, timeout=opts.request_timeout_s, watchdog_intervall=opts.watchdog_s)
        client.name = client.description = "Sensormine OPC UA ingest"
        client.session_timeout = 600_000  # ms; what most servers grant at most
        if p.username is not None:
            client.set_user(p.username)
            client.set_password(p.password or "")
        if p.security_mode != "None":
            assert p.certificate_path and p.private_key_path  # the profile validator sees to it
            uri = await _certificate_uri(p.certificate_path)
            if uri:  # servers check that the session's application URI is the certificate's
                client.application_uri = uri
            policy = getattr(security_policies, f"SecurityPolicy{p.security_policy}")
            mode = getattr(ua.MessageSecurityMode, p.security_mode)
            await asyncio.wait_for(
                client.set_security(policy, p.certificate_path, p.private_key_path, mode=mode), opts.request_timeout_s
            )

        async def on_lost(exc: Exception) -> None:
            self._signal_lost(f"connection lost ({type(exc).__name__}: {exc})")

        client.connection_lost_callback = on_lost
        await asyncio.wait_for(client.connect(), opts.request_timeout_s)
        return client

    async def _subscribe(self, client: Client) -> _DeviceSubscription:
        p, opts = self.profile, self.options
        interval = p.publishing_interval_ms
        keepalive = max(1, math.ceil(opts.keepalive_s * 1000 / interval))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval,
            RequestedLifetimeCount=max(3 * keepalive, math.ceil(60_000 / interval)),
            RequestedMaxKeepAliveCount=keepalive,
            MaxNotificationsPerPublish=0,  # no limit: a publish response is one batch
            PublishingEnabled=True,
            Priority=0,
        )
        sub = _DeviceSubscription(client.uaclient.session, params, self._on_publish)
        revised = await asyncio.wait_for(sub.init(), opts.request_timeout_s)
        sub.keepalive_s = revised.RevisedMaxKeepAliveCount * revised.RevisedPublishingInterval / 1000
        self._handles = {}
        requests = []
        for handle, node in enumerate(p.nodes, start=1):
            self._handles[handle] = node
            mparams = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=node.sampling_interval_ms,
                QueueSize=queue_size(interval, node.sampling_interval_ms),
                DiscardOldest=True,
            )
            if node.deadband is not None:
                mparams.Filter = ua.DataChangeFilter(
                    Trigger=ua.DataChangeTrigger.StatusValue,
                    DeadbandType=ua.DeadbandType.Absolute,
                    DeadbandValue=node.deadband,
                )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(
                        NodeId=ua.NodeId.from_string(node.node_id), AttributeId=ua.AttributeIds.Value
                    ),
                    MonitoringMode=ua.MonitoringMode.Reporting,
                    RequestedParameters=mparams,
                )
            )
        results = await asyncio.wait_for(sub.create_monitored_items(requests), opts.request_timeout_s)
        self.status.node_errors = {}
        for node, result in zip(p.nodes, results, strict=True):
            if isinstance(result, ua.StatusCode):  # e.g. BadNodeIdUnknown: the other nodes go on
                self.status.node_errors[node.metric] = result.name
                log.warning("%s/%s: cannot monitor %s: %s", self.tenant_id, self.device_id, node.node_id, result.name)
        return sub

    async def _watch(self, sub: _DeviceSubscription) -> str:
        """Wait until the connection is lost ("lost") or the profile changed ("changed")."""
        stale_s = max(5.0, sub.keepalive_s * self.options.stale_after_keepalives)
        while True:
            if self._lost is not None:
                return "lost"
            if self._pending is not None:
                return "changed"
            quiet = time.monotonic() - sub.last_publish
            if quiet > stale_s:
                self._lost = f"no publish response for {quiet:.0f} s"
                return "lost"
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def _signal_lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        self._wake.set()

    async def _disconnect(self, client: Client) -> None:
        client.connection_lost_callback = None
        try:
            await asyncio.wait_for(client.disconnect(), 5)
        except Exception as exc:  # the server may be gone; the socket is closed either way
            log.debug("disconnect from %s: %s", self.profile.endpoint, exc)

    # notifications

    def _on_publish(self, result: ua.PublishResult) -> None:
        try:
            self._convert(result)
        except Exception:  # never let one bad response end the publish loop
            log.exception("%s/%s: failed to convert a publish response", self.tenant_id, self.device_id)

    def _convert(self, result: ua.PublishResult) -> None:
        data = result.NotificationMessage.NotificationData
        if not data:
            return  # a keep-alive
        now = now_us()
        readings: list[Reading] = []
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                for item in notification.MonitoredItems:
                    self._item(item, now, readings)
            elif isinstance(notification, ua.StatusChangeNotification):
                status = notification.Status.value if notification.Status is not None else 0
                if quality_of(status) == QUALITY_BAD:  # BadTimeout, BadShutdown: the subscription is gone
                    self._signal_lost(f"subscription status {status_name(status)}")
        if readings:
            self.status.readings += len(readings)
            step = self.options.max_readings_per_message
            for i in range(0, len(readings), step):
                self._emit(("publish", self.tenant_id, self.device_id, readings[i : i + step]))

    def _item(self, item: ua.MonitoredItemNotification, now: int, readings: list[Reading]) -> None:
        self.status.notifications += 1
        node = self._handles.get(item.ClientHandle)
        if node is None:  # a late notification of a replaced subscription
            return
        point = to_point(item.Value, self._last_values.get(node.metric), now)
        if point is None:
            self.status.empty += 1
            return
        if isinstance(point, Rejection):
            self.status.rejected += 1
            status = item.Value.StatusCode.value if item.Value.StatusCode is not None else 0
            payload = orjson.dumps(
                {
                    "node_id": node.node_id,
                    "metric": node.metric,
                    "status": status_name(status),
                    "ts": timestamp_us(item.Value, now),
                    "value": point.value,
                },
                default=repr,
            )
            origin = f"{self.profile.endpoint}#{node.node_id}"
            self._emit(("reject", origin, point.reason, payload, self.tenant_id, self.device_id))
            return
        ts, value, quality = point
        if quality != QUALITY_BAD:
            self._last_values[node.metric] = value
        readings.append(Reading(self.tenant_id, self.device_id, node.metric, ts, value, quality, now))


# --- the daemon ---------------------------------------------------------------------------------


@dataclass
class OpcUaStats:
    """Totals over every device since start."""

    devices: int = 0
    connected: int = 0
    notifications: int = 0
    readings: int = 0
    rejected: int = 0
    empty: int = 0
    durable: int = 0  # readings the sink has confirmed (in Kafka, or committed)


async def cancel_pending() -> None:
    """Cancel every other task of the running loop (what asyncua leaves behind) and wait for them."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _QuietDisconnects(logging.Filter):
    """Drops asyncua's traceback for a publish request cut by a lost connection (the daemon logs the loss)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionError))


def quiet_asyncua_logging() -> None:
    """Keep asyncua to errors (it logs every publish at INFO), without its traceback for each lost connection."""
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    logging.getLogger("asyncua.client.ua_session.UaSession").addFilter(_QuietDisconnects())


class OpcUaDaemon:
    """Keeps one OPC UA subscription per stored profile; `start()`/`stop()` from any thread."""

    def __init__(
        self, settings: Settings | None = None, sink: ReadingSink | None = None, options: OpcUaOptions | None = None
    ) -> None:
        self.settings = settings or get_settings()
        self.options = options or OpcUaOptions()
        # Store-and-forward buffer (while Kafka or the database is unreachable) and device status counts.
        self._owns_sink = sink is None
        self.worker = SinkWorker(
            sink or tracked(make_buffered_sink(self.settings, name=f"opcua-{self.settings.env}"), self.settings),
            SOURCE,
            name="opcua-sink",
            log=log,
        )
        self.watcher = ProfileWatcher("opcua")
        self.sessions: dict[tuple[str, str], DeviceSession] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="opcua-loop", daemon=True)
        self._db: psycopg.Connection | None = None
        self._poll_now: asyncio.Event | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # profiles

    def _poll_profiles(self) -> ProfileChanges | None:
        try:
            if self._db is None or self._db.closed:
                self._db = connect(self.settings, role=INGEST)
            return self.watcher.poll(self._db)
        except psycopg.Error as exc:  # the database is away: keep the devices as they are, look again later
            log.warning("reading device profiles failed: %s", exc)
            if self._db is not None:
                self._db.close()
            self._db = None
            return None

    def _apply(self, changes: ProfileChanges) -> None:
        for stored in changes.added:
            session = DeviceSession(stored, self.options, self.worker.put)
            self.sessions[session.key] = session
            session.start()
            log.info("device %s/%s added (%s)", stored.tenant_id, stored.device_id, session.profile.endpoint)
        for stored in changes.changed:
            self.sessions[(stored.tenant_id, stored.device_id)].update(stored)
            log.info("device %s/%s profile changed (revision %d)", stored.tenant_id, stored.device_id, stored.revision)
        for key in changes.removed:
            session = self.sessions.pop(key)
            task = asyncio.create_task(session.close())
            self._closing.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._closing.discard)
            log.info("device %s/%s removed", *key)

    async def _watch_profiles(self, first: ProfileChanges) -> None:
        self._poll_now = asyncio.Event()
        self._apply(first)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), self.options.profile_poll_s)
            self._poll_now.clear()
            changes = await asyncio.to_thread(self._poll_profiles)
            if changes:
                self._apply(changes)

    # lifecycle

    def start(self) -> OpcUaDaemon:
        """Read the profiles (the database must answer) and start connecting to every device."""
        first = self._poll_profiles()
        if first is None:
            raise RuntimeError("cannot read device profiles from the database")
        self.worker.start()
        self._thread.start()

        async def begin() -> None:
            self._watch_task = asyncio.create_task(self._watch_profiles(first), name="opcua:profiles")

        asyncio.run_coroutine_threadsafe(begin(), self.loop).result(10)
        return self

    def refresh(self) -> None:
        """Read the profiles now rather than at the next poll."""
        self.loop.call_soon_threadsafe(lambda: self._poll_now.set() if self._poll_now else None)

    def stats(self) -> OpcUaStats:
        """Totals over the current devices."""
        s = OpcUaStats(devices=len(self.sessions), durable=self.worker.stats.durable)
        for session in list(self.sessions.values()):
            st = session.status
            s.connected += st.state == "connected"
            s.notifications += st.notifications
            s.readings += st.readings
            s.rejected += st.rejected
            s.empty += st.empty
        return s

    def status(self, tenant_id: str, device_id: str) -> DeviceStatus | None:
        """One device's status, or None when it has no profile."""
        session = self.sessions.get((tenant_id, device_id))
        return session.status if session else None

    def wait_connected(self, timeout: float = 30.0) -> bool:
        """Wait until every device with a profile is subscribed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sessions = list(self.sessions.values())
            if sessions and all(s.status.state == "connected" for s in sessions):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Disconnect every device, then flush what was handed to the sink."""

        async def shutdown() -> None:
            if self._watch_task is not None:
                self._watch_task.cancel()
            await asyncio.gather(*(s.close() for s in self.sessions.values()), return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
            asyncio.run_coroutine_threadsafe(cancel_pending(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.worker.close()
        close = getattr(self.worker.sink, "close", None)
        if self._owns_sink and close is not None:
            close()
        if self._db is not None:
            self._db.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the OPC UA daemon until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Sensormine OPC UA ingest daemon")
    parser.add_argument("--profile-poll", type=float, default=5.0, help="seconds between profile reads")
    parser.add_argument("--backoff-max", type=float, default=60.0, help="longest wait between reconnects (s)")
    parser.add_argument("--report-every", type=float, default=10.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    stop = stop_on_signals()
    quiet_asyncua_logging()
    options = OpcUaOptions(profile_poll_s=args.profile_poll, backoff=Backoff(max_s=args.backoff_max))
    daemon = OpcUaDaemon(options=options).start()

    def report() -> None:
        s = daemon.stats()
        log.info(
            "devices=%d connected=%d notifications=%d readings=%d durable=%d rejected=%d empty=%d",
            s.devices,
            s.connected,
            s.notifications,
            s.readings,
            s.durable,
            s.rejected,
            s.empty,
        )

    report_until(stop, report, args.report_every)
    daemon.stop()


if __name__ == "__main__":
    main()
