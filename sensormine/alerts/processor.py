"""The alarm processor: rules evaluated on readings as they are written, and absence rules on a timer.

One processor per process. It connects as `sensormine_alerts` (every tenant's rules, devices and
alarms), keeps a directory of tenants, devices and rules (reloaded when any of them changes,
checked at most every `refresh_s`), evaluates with `sensormine.alerts.engine.Engine`, writes the
transitions in one transaction per batch, and hands the raised and cleared alarms to `notify`
after the commit. On start it restores the open alarms, so a restart does not raise them again.
Absence rules are decided on each tick from `device_status` (what every ingest path records of a
device's last message) and the open alarms, so every process with a processor may tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import psycopg

from sensormine.alerts.channels import Policy, list_policies
from sensormine.alerts.dispatch import Dispatcher
from sensormine.alerts.engine import Engine, Transition, absence_transitions
from sensormine.alerts.notify import EmailChannel, HttpSmsProvider
from sensormine.alerts.rules import Absence, Rule, applicable, scored_metrics
from sensormine.alerts.store import (
    AlarmChange,
    apply_transitions,
    due_escalations,
    list_rules,
    open_alarm_times,
    outbox_done,
    outbox_due,
)
from sensormine.anomaly.metering import InferenceMeter
from sensormine.ingest.sinks import DirectSink, ReadingSink, make_sink
from sensormine.reading import Reading
from sensormine.settings import Settings

if TYPE_CHECKING:
    from sensormine.anomaly.stream import StreamScorer

log = logging.getLogger(__name__)

_VERSION = (
    "SELECT (SELECT coalesce(max(revision), 0) FROM alert_rules), (SELECT count(*) FROM alert_rules), "
    "(SELECT max(created_at) FROM escalation_policies), (SELECT count(*) FROM escalation_policies), "
    "(SELECT max(updated_at) FROM devices), (SELECT count(*) FROM devices), (SELECT count(*) FROM tenants), "
    "(SELECT max(updated_at) FROM tenants)"
)


class Directory:
    """Which rules apply to which device: tenants' ancestry, devices' types and labels, the rules."""

    def __init__(self) -> None:
        self.version: tuple[Any, ...] | None = None
        self.devices: dict[tuple[str, str], tuple[str | None, dict[str, Any]]] = {}
        self.names: dict[tuple[str, str], str] = {}
        self.by_tenant: dict[str, list[Rule]] = {}
        self.rules: dict[tuple[str, str], Rule] = {}
        self.policies: dict[tuple[str, str], Policy] = {}
        self._cache: dict[tuple[str, str], list[Rule]] = {}
        self._by_metric: dict[tuple[str, str], dict[str, tuple[list[Rule], bool]]] = {}
        self._described: dict[tuple[str, str], bytes] = {}

    def refresh(self, conn: psycopg.Connection) -> bool:
        """Reload when anything changed; whether it did."""
        version = conn.execute(_VERSION).fetchone()
        if version == self.version:
            return False
        parents: dict[str, str | None] = dict(conn.execute("SELECT id, parent_id FROM tenants").fetchall())
        ancestry: dict[str, list[str]] = {}
        for tenant in parents:
            chain: list[str] = []
            t: str | None = tenant
            while t is not None and t not in chain:
                chain.append(t)
                t = parents.get(t)
            ancestry[tenant] = chain
        rules = list_rules(conn, limit=1_000_000)
        self.policies = {(p.tenant_id, p.id): p for p in list_policies(conn)}
        self.rules = {(r.tenant_id, r.id): r for r in rules}
        self.by_tenant = applicable(rules, ancestry)
        rows = conn.execute("SELECT tenant_id, id, device_type, metadata, name FROM devices").fetchall()
        self.devices = {(t, d): (kind, meta or {}) for t, d, kind, meta, _ in rows}
        self.names = {(t, d): name for t, d, _, _, name in rows}
        self._cache = {}
        self._described = {}
        self._by_metric = {}
        self.version = version
        return True

    def rules_for(self, tenant_id: str, device_id: str) -> list[Rule]:
        """The rules watching a device (its tenant's, and inherited ones, whose scope includes it)."""
        key = (tenant_id, device_id)
        found = self._cache.get(key)
        if found is None:
            kind, meta = self.devices.get(key, (None, {}))
            found = [r for r in self.by_tenant.get(tenant_id, []) if r.scope.matches(device_id, kind, meta)]
            self._cache[key] = found
        return found

    def metric_index(self, tenant_id: str, device_id: str) -> dict[str, tuple[list[Rule], bool]]:
        """Per metric of a device: the rules watching the device whose condition reads it (`rules_for`, in
        its order), and whether one of them reads its anomaly score. Built once per device: the
        evaluator then skips, for each reading, every rule of the device that does not read its metric."""
        index = self._by_metric.get((tenant_id, device_id))
        if index is None:
            rules: dict[str, list[Rule]] = {}
            for r in self.rules_for(tenant_id, device_id):
                for m in sorted(r.reads):
                    rules.setdefault(m, []).append(r)
            index = {m: (rs, any(m in scored_metrics(r.condition) for r in rs)) for m, rs in rules.items()}
            self._by_metric[(tenant_id, device_id)] = index
        return index

    def watching(self, readings: Iterable[Reading]) -> list[tuple[Reading, list[Rule], bool]]:
        """The readings some rule reads, each with those rules and whether one reads its anomaly score."""
        out = []
        tenant = device = None
        index: dict[str, tuple[list[Rule], bool]] = {}
        for r in readings:
            if r.device_id != device or r.tenant_id != tenant:  # an envelope's readings share their device
                tenant, device = r.tenant_id, r.device_id
                index = self.metric_index(tenant, device)
            found = index.get(r.metric)
            if found is not None:
                out.append((r, *found))
        return out

    def describe(self, tenant_id: str, device_id: str) -> dict[str, Any]:
        """What the registry says of a device, for enriching alarm events and aggregates."""
        kind, labels = self.devices.get((tenant_id, device_id), (None, {}))
        return {"device_name": self.names.get((tenant_id, device_id)), "device_type": kind, "labels": labels}

    def describe_json(self, tenant_id: str, device_id: str) -> bytes:
        """`describe` as the tail of a JSON object (`,"device_name":...}`), made once per device: the stream
        processor appends it to every aggregate of the device."""
        key = (tenant_id, device_id)
        found = self._described.get(key)
        if found is None:
            found = self._described[key] = b"," + orjson.dumps(self.describe(tenant_id, device_id))[1:]
        return found

    def absence_targets(self) -> list[tuple[Rule, str, str]]:
        """(rule, tenant, device) for every registered device an absence rule watches."""
        return [
            (r, tenant, device)
            for (tenant, device) in self.devices
            for r in self.rules_for(tenant, device)
            if isinstance(r.condition, Absence)
        ]


class AlarmProcessor:
    """Evaluates every reading written against the rules, and absence rules on ticks. Thread-safe."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        clock: Callable[[], float] = time.time,
        refresh_s: float = 2.0,
        notify: Callable[[list[AlarmChange]], None] | None = None,
        warmup_s: float = 0.0,
    ) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self.outbox = False  # queue raises and clears in alarm_outbox (the stream processor publishes them)
        self.clock = clock
        self.engine = Engine()
        self.meter = InferenceMeter()
        self.scorer: StreamScorer | None = None
        self._models_version: tuple[Any, ...] | None = None
        self.directory = Directory()
        self.refresh_s = refresh_s
        self.notify = notify
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        with self._lock:
            self._refresh(force=True)
            self._restore()
        if warmup_s > 0:
            self.warm_up(warmup_s)

    def replay_since(self, warmup_s: float) -> float:
        """From when (epoch seconds) a warm-up of `warmup_s` replays: at least the longest `for_s` plus
        a minute before now."""
        return self.clock() - max([warmup_s, *(r.for_s + 60 for r in self.directory.rules.values())])

    def warm_up(self, warmup_s: float, batch: int = 50_000) -> int:
        """Rebuild the evaluator's state from the hot store: replay the last `warmup_s` seconds (at least
        the longest `for_s` plus a minute) of every metric a rule reads; returns the readings replayed.

        The replay goes through the same evaluation and store as live readings, so what was already
        evaluated changes nothing (transition ids, last-update times), while latest values, hysteresis
        latches and how long a duration condition has held come back, and an alarm the process missed
        while it was down is raised now.
        """
        metrics = sorted({m for r in self.directory.rules.values() for m in r.reads})
        if not metrics:
            return 0
        since = datetime.fromtimestamp(self.replay_since(warmup_s), UTC)
        replayed = 0
        for readings in recent_readings(self._connect, since, metrics=metrics, batch=batch):
            self.process(readings)
            replayed += len(readings)
        log.info("alarm state rebuilt from %d readings since %s", replayed, since.isoformat())
        return replayed

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._checked < self.refresh_s:
            return
        conn = self._db()
        with conn.transaction():
            self.directory.refresh(conn)
        self._checked = time.monotonic()

    def _restore(self) -> None:
        conn = self._db()
        with conn.transaction():
            raised = open_alarm_times(conn)
        for (rule_tenant, rule_id, tenant, device), raised_us in raised.items():
            rule = self.directory.rules.get((rule_tenant, rule_id))
            if rule is not None:
                self.engine.restore(rule, tenant, device, raised_us)

    def _run(
        self, evaluate: Callable[[psycopg.Connection], tuple[list[Transition], list[AlarmChange]]]
    ) -> list[AlarmChange]:
        with self._lock:
            try:
                self._refresh()
                conn = self._db()
                with conn.transaction():
                    transitions, changes = evaluate(conn)
                    if transitions:
                        now = datetime.fromtimestamp(self.clock(), UTC)
                        changes += apply_transitions(conn, transitions, self.directory.policies, now, self.outbox)
            except psycopg.OperationalError:
                if self._conn is not None:
                    self._conn.close()
                raise
        if changes and self.notify is not None:
            try:
                self.notify(changes)
            except Exception:
                log.exception("alarm notifications failed")
        return changes

    def process(self, readings: Sequence[Reading]) -> list[AlarmChange]:
        """Evaluate written readings; the alarms raised or cleared."""

        def evaluate(conn: psycopg.Connection) -> tuple[list[Transition], list[AlarmChange]]:
            watched = self.directory.watching(readings)
            scores = self._scores(conn, [r for r, _, scored in watched if scored])
            return self.engine.observe_many((r, rules, scores.get(r.key)) for r, rules, _ in watched), []

        return self._run(evaluate)

    def _device_type(self, tenant_id: str, device_id: str) -> str | None:
        return self.directory.devices.get((tenant_id, device_id), (None, {}))[0]

    def _scores(self, conn: psycopg.Connection, readings: list[Reading]) -> dict[tuple[str, str, str, int], float]:
        """Anomaly scores of the readings an anomaly condition reads (each counted as an ML inference)."""
        if not readings:
            return {}
        # onnxruntime and onnx take over a second to import: only processes with anomaly rules pay it.
        from sensormine.anomaly.model import OnnxScorer
        from sensormine.anomaly.registry import models_for
        from sensormine.anomaly.stream import StreamScorer

        if self.scorer is None or self._models_version != self.directory.version:
            types = sorted({kind for kind, _ in self.directory.devices.values() if kind})
            models = {t: OnnxScorer(rec.onnx) for t, rec in models_for(conn, types).items()}
            if self.scorer is None:
                self.scorer = StreamScorer(models, self._device_type, self.meter)
            else:
                self.scorer.models = models  # the series' feature state carries over
            self._models_version = self.directory.version
        got = self.scorer.score(readings)
        return {r.key: s for r, s in zip(readings, got, strict=True) if s is not None}

    def outbox_due(self, age_s: float, limit: int = 1000) -> list[AlarmChange]:
        """Queued alarm changes older than `age_s` (the database's clock) that no one confirmed: to publish again."""
        with self._lock:
            conn = self._db()
            with conn.transaction():
                return outbox_due(conn, age_s, limit)

    def outbox_done(self, changes: Sequence[AlarmChange]) -> None:
        """Published and confirmed: off the outbox."""
        with self._lock:
            conn = self._db()
            with conn.transaction():
                outbox_done(conn, changes)

    def tick(self) -> list[AlarmChange]:
        """Absence rules against the clock and the stored last-seen times, and escalations that are due.

        Also writes the ML inferences counted since the last tick to the usage table.
        """
        with self._lock:
            self.meter.flush(self._db())

        def evaluate(conn: psycopg.Connection) -> tuple[list[Transition], list[AlarmChange]]:
            now = self.clock()
            due = [
                AlarmChange("reminder" if reminder else "escalated", alarm, self.directory.rules.get(
                    (alarm.rule_tenant_id, alarm.rule_id)), level)
                for alarm, level, reminder in due_escalations(
                    conn, self.directory.policies, datetime.fromtimestamp(now, UTC)
                )
            ]  # fmt: skip
            targets = self.directory.absence_targets()
            if not targets:
                return [], due
            silent = {
                (t, d): now - last
                for t, d, last in conn.execute(
                    "SELECT d.tenant_id, d.id, extract(epoch FROM greatest(d.created_at, s.last_seen))::float8 "
                    "FROM devices d LEFT JOIN device_status s ON s.tenant_id = d.tenant_id AND s.device_id = d.id"
                ).fetchall()
            }
            return absence_transitions(targets, silent, set(open_alarm_times(conn)), int(now * 1_000_000)), due

        return self._run(evaluate)

    def start(self, interval_s: float = 1.0) -> None:
        """Tick in a background thread every `interval_s` until `close`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:
                    log.exception("alarm tick failed; retrying in %.0f s", interval_s)

        self._timer = threading.Thread(target=loop, name="alarm-ticks", daemon=True)
        self._timer.start()

    def close(self) -> None:
        """Stop ticking, let the notifications queued so far go out, and close the connection."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=10)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
        close_notify = getattr(self.notify, "close", None)
        if close_notify is not None:
            close_notify()


def recent_readings(
    connect: Callable[[], psycopg.Connection],
    since: datetime,
    metrics: Sequence[str] | None = None,
    tenants: Sequence[str] | None = None,
    batch: int = 50_000,
) -> Iterator[list[Reading]]:
    """The hot store's readings from `since` (of these metrics, of these tenants; None: all), in
    event-time order, in batches that never split one time's readings, through a server-side cursor
    on a connection of its own."""
    where: list[str] = ["ts >= %s"]
    params: list[Any] = [since]
    for column, values in (("metric", metrics), ("tenant_id", tenants)):
        if values is not None:
            where.append(f"{column} = ANY(%s)")
            params.append(list(values))
    conn = connect()
    try:
        with conn.transaction(), conn.cursor(name="alarm-warm-up") as cur:
            cur.itersize = batch
            cur.execute(
                "SELECT tenant_id, device_id, metric, (extract(epoch FROM ts) * 1000000)::bigint, value "
                f"FROM telemetry WHERE {' AND '.join(where)} ORDER BY ts",
                params,
            )
            held: list[Reading] = []
            while rows := cur.fetchmany(batch):
                readings = held + [Reading(*row) for row in rows]
                # The readings of the newest time wait for the next batch: an instant (a device's metrics
                # at one time) is never split, so a condition over several metrics is decided on all of it.
                cut = len(readings)
                while cut > 0 and readings[cut - 1].ts == readings[-1].ts:
                    cut -= 1
                held = readings[cut:]
                if cut:
                    yield readings[:cut]
            if held:
                yield held
    finally:
        conn.close()


def start_processor(
    settings: Settings, clock: Callable[[], float] = time.time, ticks: bool = True, warm_up: bool = True
) -> AlarmProcessor:
    """The processor of a process's write path: its own connection as sensormine_alerts, e-mail through
    SENSORMINE_SMTP_URL, SMS through SENSORMINE_SMS_URL, ticks (absence, escalation) every `alerts_tick_s`
    (`ticks=False`: the caller ticks), its state rebuilt from the last `alerts_warmup_s` of the hot store
    (`warm_up=False`: the caller rebuilds it, as the stream processor does per assigned partition)."""
    from sensormine.clients.postgres import ALERTS, connect

    email = EmailChannel(settings.smtp_url, settings.smtp_from) if settings.smtp_url else None
    sms = HttpSmsProvider(settings.sms_url, settings.sms_token or "") if settings.sms_url else None
    dispatcher = Dispatcher(lambda: connect(settings, role=ALERTS), email, sms)
    processor = AlarmProcessor(
        lambda: connect(settings, role=ALERTS),
        clock=clock,
        refresh_s=settings.alerts_refresh_s,
        notify=dispatcher,
        warmup_s=settings.alerts_warmup_s if warm_up else 0.0,
    )
    if ticks:
        processor.start(settings.alerts_tick_s)
    return processor


def watched_sink(settings: Settings) -> ReadingSink:
    """The write path's sink with the rules watching it: without Kafka (and unless `alerts_in_process`
    is off) an in-process DirectSink that hands every stored batch to a processor; with Kafka the
    plain KafkaSink (the stream processor, ingest_daemons/streamproc.py, watches the topics)."""
    if settings.kafka_bootstrap or not settings.alerts_in_process:
        return make_sink(settings)
    from sensormine.clients.postgres import INGEST, connect

    processor = start_processor(settings)
    return DirectSink(lambda: connect(settings, role=INGEST), settings, processor.process, processor.close)
