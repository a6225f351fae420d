"""Alarm stream processor benchmark: telemetry topics → `StreamProcessor` → alarms in PostgreSQL, against a
bare consumer that only decodes the same messages.

Run with `uv run python -m bench.streamproc [--readings 1000000] [--trials 3]` after `sensormine services up`
(it reads SENSORMINE_DATABASE_URL and SENSORMINE_KAFKA_BOOTSTRAP). It creates its own database, topic
prefix and consumer groups, and removes them at the end.

The set-up registers 10,000 devices over 10 tenants (5 device types, 8 sites as a `site` label) and
1,000 alarm rules (100 per tenant): thresholds with hysteresis, some with `for_s` durations, bands,
`all` / `any` combinations, each scoped by device type, or by type and site label, so each device is
watched by 6 rules, not by all 1,000. The readings are produced once through the platform's
`KafkaSink` (one envelope per device per sampling round, 10 metrics each); about 3 % of the
(device, metric) series drift out of range for a few rounds and come back, so alarms are raised,
repeated and cleared. Then each trial, in the same run over the same topic contents, alternating
which goes first:

- bare consumer (the like-for-like ceiling): a confluent_kafka consumer in its own group, the same
  consumer settings (`make_consumer`), pattern subscription and batch size as the stream processor,
  that decodes every envelope with `decode_envelope` and does nothing else (no offset commits);
- stream processor: `ingest_daemons.streamproc.StreamProcessor` as shipped, in its own group,
  against an emptied alarm store, consuming until it has processed every message: decode, the
  directory's rules per device, `Engine.observe`, the transitions written in one PostgreSQL
  transaction per batch, alarm events published to `{env}.{tenant}.alerts`, offsets committed.

Both are timed from the first batch received to the last message handled. What the stream
processor pays is the cold path: a new processor each trial (empty in-memory state, the per-device
rule lists built as devices first appear), every transition written to PostgreSQL; nothing is
cached across trials. The in-memory evaluation alone (`Directory` + `Engine` over the produced
readings, no Kafka, no PostgreSQL) is timed once as a reference and gives the expected number of
alarms, which every trial must reproduce (counters and rows in `alarms`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
from confluent_kafka import Message

from bench.common import checkpoint, database_url_for, loadavg, rate, say, scratch_database
from ingest_daemons.streamproc import StreamProcessor
from sensormine.alerts import usecases
from sensormine.alerts.engine import Engine
from sensormine.alerts.processor import Directory
from sensormine.alerts.store import AlarmChange
from sensormine.clients.kafka import ensure_topics, make_admin, make_consumer
from sensormine.devices.registry import create_device
from sensormine.identity.credentials import operator_identity
from sensormine.ingest.sinks import KafkaSink
from sensormine.reading import Reading
from sensormine.settings import Settings
from sensormine.telemetry.payload import decode_envelope
from sensormine.tenancy.tenants import create_tenant

# (name, normal centre, amplitude): normal values stay within ±0.8 amplitude; rule limits are at
# ±1.5 amplitude, faults go to ±2.2 amplitude.
METRICS = (
    ("temperature", 60.0, 10.0), ("pressure", 6.0, 1.0), ("humidity", 45.0, 8.0),
    ("vibration_rms", 2.0, 0.5), ("motor_current", 30.0, 5.0), ("line_voltage", 400.0, 8.0),
    ("power_kw", 75.0, 12.0), ("flow_rate", 120.0, 15.0), ("spindle_rpm", 3000.0, 200.0),
    ("oil_temp", 55.0, 6.0),
)  # fmt: skip
DEVICE_TYPES = ("press", "pump", "compressor", "conveyor", "oven")
SITES = 8
RULES_PER_TYPE = 20  # per tenant: 4 scoped by device type, 16 by type and site (2 per site)
TYPE_ONLY_RULES = 4
SEVERITIES = ("critical", "major", "minor", "warning")
FAULT_PERCENT = 3  # of (device, metric) series that drift out of range
FAULT_ROUNDS = 4
STEP_S = 30  # seconds between a device's sampling rounds (event time)


@dataclass(frozen=True)
class Workload:
    """`rounds` envelopes of every device (one sample of every metric each), over `tenants` tenants."""

    readings: int
    devices: int
    tenants: int
    partitions: int = 4

    @property
    def metrics(self) -> int:
        """Readings per envelope."""
        return len(METRICS)

    @property
    def rounds(self) -> int:
        """Sampling rounds needed to reach at least `readings`."""
        return math.ceil(self.readings / (self.devices * self.metrics))

    @property
    def messages(self) -> int:
        """Kafka messages produced: one per device per round."""
        return self.rounds * self.devices

    @property
    def total(self) -> int:
        """Readings produced (whole rounds)."""
        return self.messages * self.metrics

    @property
    def rules(self) -> int:
        """Alarm rules stored."""
        return self.tenants * len(DEVICE_TYPES) * RULES_PER_TYPE

    def tenant_ids(self) -> list[str]:
        """Tenant ids, one telemetry topic each."""
        return [f"bench-t{i}" for i in range(self.tenants)]

    def devices_of(self) -> list[tuple[str, str, str, dict[str, str]]]:
        """(tenant, device id, device type, labels) of every device."""
        tenants = self.tenant_ids()
        out = []
        for g in range(self.devices):
            j = g // len(tenants)
            labels = {"site": f"site-{(j // len(DEVICE_TYPES)) % SITES}", "line": f"line-{j % 3}"}
            out.append((tenants[g % len(tenants)], f"dev-{j:05d}", DEVICE_TYPES[j % len(DEVICE_TYPES)], labels))
        return out


def rule_fields(type_index: int, k: int) -> tuple[str, dict]:
    """Rule `k` of one device type in a tenant: its id and its fields (a mix of condition kinds)."""
    device_type = DEVICE_TYPES[type_index]
    m = (type_index * 2 + k) % len(METRICS)
    m2 = (m + 3) % len(METRICS)
    (name, c, a), (name2, c2, a2) = METRICS[m], METRICS[m2]
    hi, lo, hyst = c + 1.5 * a, c - 1.5 * a, round(0.3 * a, 3)
    kind = k % 5
    for_s = 0.0
    if kind == 0:
        condition: dict = {"kind": "threshold", "metric": name, "op": "gt", "value": hi, "hysteresis": hyst}
    elif kind == 1:
        condition = {"kind": "threshold", "metric": name, "op": "gt", "value": hi, "hysteresis": hyst}
        for_s = 2 * STEP_S  # "above the limit for a minute": three samples in a row
    elif kind == 2:
        condition = {"kind": "threshold", "metric": name, "op": "outside", "low": lo, "high": hi, "hysteresis": hyst}
    elif kind == 3:
        condition = {
            "kind": "all",
            "conditions": [
                {"kind": "threshold", "metric": name, "op": "gt", "value": hi, "hysteresis": hyst},
                {"kind": "threshold", "metric": name2, "op": "gt", "value": c2 - 0.5 * a2},
            ],
        }
        for_s = float(STEP_S) if k % 2 else 0.0
    else:
        condition = {
            "kind": "any",
            "conditions": [
                {"kind": "threshold", "metric": name, "op": "gt", "value": hi, "hysteresis": hyst},
                {"kind": "threshold", "metric": name2, "op": "lt", "value": c2 - 1.5 * a2, "hysteresis": 0.3 * a2},
            ],
        }
    scope: dict = {"device_type": device_type}
    if k >= TYPE_ONLY_RULES:
        scope["labels"] = {"site": f"site-{(k - TYPE_ONLY_RULES) // 2}"}
    rule_id = f"{device_type}-{k:02d}"
    return rule_id, {
        "name": f"{device_type} {k:02d}: {condition['kind']} on {name}",
        "severity": SEVERITIES[k % len(SEVERITIES)],
        "condition": condition,
        "scope": scope,
        "for_s": for_s,
    }


def set_up(conn: psycopg.Connection, workload: Workload) -> None:
    """Tenants, devices (type and labels, not provisioned at the broker) and rules (through the use case)."""
    for tenant in workload.tenant_ids():
        create_tenant(conn, tenant, plan="enterprise")
    conn.commit()
    devices = workload.devices_of()
    t0 = time.perf_counter()
    for i, (tenant, device, device_type, labels) in enumerate(devices, 1):
        create_device(conn, tenant, device, device_type=device_type, metadata=labels, at_broker=False)
        if i % 1000 == 0 or i == len(devices):
            conn.commit()
            say(f"  devices: {i:,} / {len(devices):,} ({rate(i, time.perf_counter() - t0):,.0f}/s)")
    actor = operator_identity(conn)
    done = 0
    for tenant in workload.tenant_ids():
        for type_index in range(len(DEVICE_TYPES)):
            for k in range(RULES_PER_TYPE):
                rule_id, fields = rule_fields(type_index, k)
                usecases.create_rule(conn, actor, tenant, rule_id, fields)
                done += 1
        conn.commit()
        say(f"  rules: {done:,} / {workload.rules:,}")


def value(g: int, j: int, r: int) -> float:
    """Metric `j` of device number `g` in round `r`: a normal wave, or out of range while the series is faulty."""
    _, c, a = METRICS[j]
    faulty = (g * 31 + j * 17) % 100 < FAULT_PERCENT
    start = g % 4
    if faulty and start <= r < start + FAULT_ROUNDS:
        sign = 1 if (g + j) % 2 == 0 else -1
        return round(c + sign * (2.2 + 0.1 * math.sin(r + j)) * a, 4)
    return round(c + 0.8 * a * math.sin(r / 3 + g * 0.7 + j), 4)


def messages_of(workload: Workload) -> list[list[Reading]]:
    """Every envelope's readings, in production order (round by round, device by device)."""
    metrics = [m for m, _, _ in METRICS]
    start_us = (int(time.time()) - 86_400) * 1_000_000
    devices = workload.devices_of()
    out = []
    for r in range(workload.rounds):
        for g, (tenant, device, _, _) in enumerate(devices):
            ts = start_us + r * STEP_S * 1_000_000 + (g * 7_919) % 1_000 * 1_000  # not in lockstep
            out.append([Reading(tenant, device, m, ts, value(g, j, r), 0, ts + 150_000) for j, m in enumerate(metrics)])
    return out


def produce(settings: Settings, messages: list[list[Reading]]) -> float:
    """Publish every envelope through the platform's KafkaSink; seconds taken."""
    sink = KafkaSink(settings)
    t0 = time.perf_counter()
    every = max(1, len(messages) // 10)
    for i, points in enumerate(messages, 1):
        sink.publish(points[0].tenant_id, points[0].device_id, "bench", points)
        if i % every == 0:
            say(f"  produced {i:,} / {len(messages):,} messages ({rate(i, time.perf_counter() - t0):,.0f}/s)")
    pending = sink.flush(120)
    if pending or sink.delivery_errors:
        raise RuntimeError(f"Kafka delivery failed: {pending} pending, {sink.delivery_errors} errors")
    return time.perf_counter() - t0


def reference(url: str, messages: list[list[Reading]]) -> tuple[float, int, int]:
    """In-memory evaluation of the same readings (no Kafka, no PostgreSQL): seconds, raises, clears.

    Each device's envelopes are on one partition (keyed by device) and its rules' state is its own,
    so the stream processor must reach exactly these transitions whatever the partitions' interleaving.
    """
    directory = Directory()
    with psycopg.connect(url) as conn:
        directory.refresh(conn)
    engine = Engine()
    raised = cleared = 0
    t0 = time.perf_counter()
    for readings in messages:  # as AlarmProcessor.process, one message at a time
        for t in engine.observe_many((r, rules, None) for r, rules, _ in directory.watching(readings)):
            raised += t.kind == "raise"
            cleared += t.kind == "clear"
    return time.perf_counter() - t0, raised, cleared


def bare_consumer(settings: Settings, group: str, total: int, timeout_s: float) -> tuple[float, int]:
    """Consume and decode every message, nothing else; first batch → last message seconds, readings."""
    consumer = make_consumer(group, settings)
    consumer.subscribe([settings.telemetry_topic_pattern])
    seen = readings = 0
    first: float | None = None
    started = last_report = time.monotonic()
    try:
        while seen < total:
            got = consumer.consume(num_messages=5_000, timeout=0.2)
            now = time.monotonic()
            if now - started > timeout_s:
                raise TimeoutError(f"bare consumer saw {seen:,} of {total:,} messages in {timeout_s:.0f} s")
            if not got:
                continue
            if first is None:
                first = time.perf_counter()
            for msg in got:
                if msg.error() is None:
                    seen += 1
                    readings += len(decode_envelope(msg.value() or b""))
            if now - last_report >= 2:
                say(f"    bare consumer: {seen:,} / {total:,} messages")
                last_report = now
        assert first is not None
        return time.perf_counter() - first, readings
    finally:
        consumer.close()


class TimedStreamProcessor(StreamProcessor):
    """The shipped stream processor, noting when its first batch arrived and when it had processed `total`
    messages; optionally profiling its `process` calls (decode, evaluate, store, publish, commit)."""

    def __init__(self, settings: Settings, total: int, profile: bool = False) -> None:
        super().__init__(settings)
        self.total = total
        self.first_at: float | None = None
        self.done_at: float | None = None
        self.done = threading.Event()
        self.profiler = cProfile.Profile() if profile else None

    def process(self, messages: list[Message]) -> list[AlarmChange]:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()
        try:
            changes = super().process(messages)
        finally:
            if self.profiler is not None:
                self.profiler.disable()
        if self.stats.messages >= self.total and self.done_at is None:
            self.done_at = time.perf_counter()
            self.done.set()
        return changes


def stream_processor(settings: Settings, total: int, timeout_s: float, profile: bool) -> TimedStreamProcessor:
    """Run the stream processor until it has processed every message; returns it, stopped and closed."""
    proc = TimedStreamProcessor(settings, total, profile)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            proc.run(stop)
        except BaseException as exc:  # surfaced in the main thread
            failure.append(exc)
            proc.done.set()

    thread = threading.Thread(target=run, name="bench-streamproc")
    thread.start()
    started = time.monotonic()
    try:
        while not proc.done.wait(2):
            say(f"    stream processor: {proc.stats.messages:,} / {total:,} messages, {proc.stats.raised:,} raised")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"the stream processor did not finish within {timeout_s:.0f} s")
    finally:
        stop.set()
        thread.join()
        proc.close()
    if failure:
        raise RuntimeError("the stream processor failed") from failure[0]
    return proc


def reset_alarms(url: str) -> None:
    """Empty the alarm store for the next trial (rules, devices and tenants stay)."""
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE alarm_outbox, alarm_deliveries, alarm_events, alarms")


@dataclass
class Results:
    """Seconds per trial, per phase, and what the stream processor did."""

    produce_s: float = 0.0
    reference_s: float = 0.0
    expected: tuple[int, int] = (0, 0)  # raises, clears of the in-memory evaluation
    bare_s: list[float] = field(default_factory=list)
    proc_s: list[float] = field(default_factory=list)
    raised: list[int] = field(default_factory=list)
    cleared: list[int] = field(default_factory=list)
    alarm_rows: list[int] = field(default_factory=list)
    counted: list[int] = field(default_factory=list)  # sum of the alarms' counts (raise + repeats)
    published: list[int] = field(default_factory=list)


TARGET_RATE = 100_000
TARGET_RATIO = 0.5


def report(workload: Workload, results: Results, load: list[str]) -> str:
    """The figures as a table (medians over the trials, with the range) and the verdict against the targets."""
    total = workload.total

    def row(label: str, seconds: list[float]) -> str:
        rates = sorted(rate(total, s) for s in seconds)
        spread = f"{rates[0]:,.0f} - {rates[-1]:,.0f}" if len(rates) > 1 else ""
        median = statistics.median(seconds)
        return f"{label:<62}{median:>9.2f}{rate(total, median):>13,.0f}{spread:>22}"

    bare = rate(total, statistics.median(results.bare_s))
    proc = rate(total, statistics.median(results.proc_s))
    ratio = rate(proc, bare)
    paired = statistics.median(rate(b, p) for b, p in zip(results.bare_s, results.proc_s, strict=True))
    width = 106
    lines = [
        f"Alarm stream processor benchmark, {os.cpu_count()} cores: {total:,} readings in {workload.messages:,} "
        f"Kafka messages ({workload.metrics} readings each), {workload.devices:,} devices over {workload.tenants} "
        f"tenants ({workload.tenants} topics x {workload.partitions} partitions), {workload.rules:,} rules "
        f"(6 per device); median of {len(results.proc_s)} trials, phases alternating",
        "measured: the cold path: rule evaluation + PostgreSQL writes of every transition, no cache across trials",
        f"load average (1, 5, 15 min) at start / end: {load[0]} / {load[-1]}",
        "",
        f"{'phase':<62}{'seconds':>9}{'readings/s':>13}{'range (readings/s)':>22}",
        "-" * width,
        row("produce to Kafka through KafkaSink (setup, not compared)", [results.produce_s]),
        row("in-memory evaluation: Directory + Engine (no Kafka, no PG)", [results.reference_s]),
        row("(a) bare consumer: consume + decode_envelope (ceiling)", results.bare_s),
        row("(b) StreamProcessor: decode, evaluate, store, publish, commit", results.proc_s),
        "-" * width,
        f"{'ratio (b) / (a), of the medians':<62}{'':>9}{ratio:>13.2f}",
        f"{'ratio (b) / (a), median of per-trial ratios':<62}{'':>9}{paired:>13.2f}",
        "",
        f"alarms: expected {results.expected[0]:,} raised and {results.expected[1]:,} cleared (in-memory evaluation); "
        f"the stream processor raised {sorted(set(results.raised))}, cleared {sorted(set(results.cleared))}, "
        f"alarm rows {sorted(set(results.alarm_rows))} counting {sorted(set(results.counted))} readings in alarm, "
        f"events published {sorted(set(results.published))}",
        "",
        f"target >= {TARGET_RATE:,} readings/s (stream processor): {proc:,.0f} -> "
        f"{'met' if proc >= TARGET_RATE else 'NOT met'}",
        f"target ratio >= {TARGET_RATIO}: {ratio:.2f} -> {'met' if ratio >= TARGET_RATIO else 'NOT met'}",
    ]
    return "\n".join(lines)


def print_profile(profiler: cProfile.Profile, top: int = 30) -> None:
    """The stream processor's `process` calls: top functions by cumulative and by own time."""
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\n--- profile of StreamProcessor.process, by {key} ---\n{out.getvalue()}", flush=True)


def cleanup_kafka(settings: Settings, workload: Workload, groups: list[str]) -> None:
    """Delete the benchmark's topics and consumer groups."""
    admin = make_admin(settings)
    existing = set(admin.list_topics(timeout=10).topics)
    tenants = workload.tenant_ids()
    wanted = [settings.telemetry_topic(t) for t in tenants] + [settings.alerts_topic(t) for t in tenants]
    topics = [t for t in wanted if t in existing]
    if topics:
        for fut in admin.delete_topics(topics, operation_timeout=30).values():
            fut.result(30)
    if groups:
        for fut in admin.delete_consumer_groups(groups, request_timeout=30).values():
            try:
                fut.result(30)
            except Exception as exc:  # a group that never committed has nothing to clean
                say(f"consumer group cleanup: {exc}")


def run(workload: Workload, base_url: str, bootstrap: str, trials: int, timeout_s: float, profile: bool) -> str:
    """Set up, produce once, then `trials` times (bare consumer, stream processor, alternating); the report."""
    env = f"bench{uuid.uuid4().hex[:8]}"
    results = Results()
    groups: list[str] = []
    load = [loadavg()]
    profiler: cProfile.Profile | None = None
    with scratch_database(base_url, prefix="bench_alerts") as url:
        owner = os.environ.get("SENSORMINE_DATABASE_MIGRATE_URL")
        base = Settings(
            env=env,
            database_url=url,
            database_migrate_url=database_url_for(owner, url.rsplit("/", 1)[1]) if owner else None,
            kafka_bootstrap=bootstrap,
        )
        say(f"database {url.rsplit('/', 1)[1]}, topic prefix {env}, load average {load[0]}")
        try:
            say(f"setting up {workload.tenants} tenants, {workload.devices:,} devices, {workload.rules:,} rules ...")
            with psycopg.connect(url) as conn:
                set_up(conn, workload)
            ensure_topics([base.telemetry_topic(t) for t in workload.tenant_ids()], workload.partitions, base)
            say(f"building {workload.messages:,} envelopes ({workload.total:,} readings) ...")
            messages = messages_of(workload)
            say("producing through KafkaSink ...")
            results.produce_s = produce(base, messages)
            say("in-memory evaluation (the reference) ...")
            results.reference_s, *expected = reference(url, messages)
            results.expected = (expected[0], expected[1])
            del messages
            say(
                f"  {rate(workload.total, results.reference_s):,.0f} readings/s; expect {expected[0]:,} raised, "
                f"{expected[1]:,} cleared"
            )
            for trial in range(1, trials + 1):
                phases = ("bare", "proc") if trial % 2 else ("proc", "bare")
                for phase in phases:
                    group = f"{env}-{phase}-{trial}"
                    groups.append(group)
                    if phase == "bare":
                        say(f"trial {trial}/{trials}: bare consumer ...")
                        seconds, readings = bare_consumer(base, group, workload.messages, timeout_s)
                        if readings != workload.total:
                            raise RuntimeError(f"bare consumer decoded {readings:,} readings, not {workload.total:,}")
                        results.bare_s.append(seconds)
                        say(f"trial {trial}/{trials}: bare consumer {rate(workload.total, seconds):,.0f} readings/s")
                        continue
                    reset_alarms(url)
                    checkpoint(url)
                    say(f"trial {trial}/{trials}: stream processor ...")
                    settings = base.model_copy(update={"alerts_group": group})
                    proc = stream_processor(settings, workload.messages, timeout_s, profile and profiler is None)
                    assert proc.first_at is not None and proc.done_at is not None
                    seconds = proc.done_at - proc.first_at
                    if proc.stats.readings != workload.total:
                        raise RuntimeError(f"stream processor saw {proc.stats.readings:,} readings")
                    with psycopg.connect(url) as conn:
                        rows = conn.execute("SELECT count(*), coalesce(sum(count), 0) FROM alarms").fetchone()
                    results.proc_s.append(seconds)
                    results.raised.append(proc.stats.raised)
                    results.cleared.append(proc.stats.cleared)
                    results.alarm_rows.append(rows[0] if rows else -1)
                    results.counted.append(rows[1] if rows else -1)
                    results.published.append(proc.stats.published)
                    if proc.profiler is not None:
                        profiler = proc.profiler
                    say(
                        f"trial {trial}/{trials}: stream processor {rate(workload.total, seconds):,.0f} readings/s, "
                        f"{proc.stats.raised:,} raised, {proc.stats.cleared:,} cleared"
                    )
            if set(results.raised) != {results.expected[0]} or set(results.alarm_rows) != {results.expected[0]}:
                say("WARNING: the stream processor's alarms differ from the in-memory evaluation")
        finally:
            cleanup_kafka(base, workload, groups)
    load.append(loadavg())
    if profiler is not None:
        print_profile(profiler)
    return report(workload, results, load)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table; everything it created is removed."""
    parser = argparse.ArgumentParser(prog="python -m bench.streamproc", description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings to produce (whole rounds)")
    parser.add_argument("--devices", type=int, default=10_000, help="devices, spread over the tenants")
    parser.add_argument("--tenants", type=int, default=10, help="tenants, one topic each, 100 rules each")
    parser.add_argument("--partitions", type=int, default=4, help="Kafka partitions per topic")
    parser.add_argument("--trials", type=int, default=3, help="runs of each phase, alternating; medians reported")
    parser.add_argument("--timeout", type=float, default=900, help="give up when one phase takes longer (s)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first stream-processor trial")
    args = parser.parse_args(argv)

    base_url = os.environ.get("SENSORMINE_DATABASE_URL")
    bootstrap = os.environ.get("SENSORMINE_KAFKA_BOOTSTRAP")
    if not base_url or not bootstrap:
        raise SystemExit("set SENSORMINE_DATABASE_URL and SENSORMINE_KAFKA_BOOTSTRAP: source .sensormine/services.env")
    workload = Workload(args.readings, args.devices, args.tenants, args.partitions)
    print(run(workload, base_url, bootstrap, args.trials, args.timeout, args.profile), flush=True)


if __name__ == "__main__":
    main()
