"""SIGKILL the stream processor (`sensormine ingest alerts`, a real process) mid-window, while a duration
condition is holding and with the hot-store consumer stopped halfway (so the rebuild has to read the
rest back from Kafka), and restart it; or let a second member join the group there, so partitions
move: either way the same alarms, alarm events and window aggregates as an uninterrupted run of the
same rules over the same readings, none lost, none doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition

from ingest_daemons.streamproc import StreamProcessor
from sensormine.alerts import usecases
from sensormine.alerts.engine import replay
from sensormine.alerts.store import list_rules
from sensormine.alerts.windows import Windows
from sensormine.clients.kafka import ensure_topics, partition_of
from sensormine.identity.credentials import operator_identity
from sensormine.ingest.sinks import KafkaSink
from sensormine.reading import Reading
from sensormine.settings import Settings
from tests.e2e.test_consumer_restart import start_consumer
from tests.factories import drain_topic, make_tenant, wait_for

pytestmark = pytest.mark.e2e

S = 1_000_000
DEVICES = ("m1", "m2", "m3", "m4")
SECONDS = 40  # one envelope (temperature, pressure) per device and second; the kill falls after second 19
RULES = {
    "overheat": {
        "name": "Motor overheating",
        "severity": "critical",
        "for_s": 3,
        "condition": {"kind": "threshold", "metric": "temperature", "op": "gt", "value": 90, "hysteresis": 5},
    },
    "odd": {
        "name": "Pressure high or temperature implausible",
        "severity": "major",
        "condition": {
            "kind": "any",
            "conditions": [
                {"kind": "threshold", "metric": "pressure", "op": "gt", "value": 8},
                {"kind": "threshold", "metric": "temperature", "op": "lt", "value": 10},
            ],
        },
    },
}


def temperature(device: str, t: int) -> float:
    if device == "m1":
        return 95.0 if 10 <= t < 30 else 80.0  # raised at 13 s (before the kill), cleared at 30 s
    if device == "m2":
        return 95.0 + t / 10 if 17 <= t < 26 else 80.0  # holding from 17 s: raised at 20 s, after the restart
    if device == "m4":
        return 5.0 if 18 <= t < 22 else 80.0  # "odd" across the kill
    return 80.0


def pressure(device: str, t: int) -> float:
    return 9.0 if device == "m3" and 15 <= t < 23 else 5.0


def envelopes(base_us: int, seconds: range) -> list[list[Reading]]:
    return [
        [
            Reading("acme", d, "temperature", base_us + t * S, temperature(d, t)),
            Reading("acme", d, "pressure", base_us + t * S, pressure(d, t)),
        ]
        for t in seconds
        for d in DEVICES
    ]


def publish(settings: Settings, batches: list[list[Reading]]) -> None:
    sink = KafkaSink(settings)
    for batch in batches:
        sink.publish("acme", batch[0].device_id, "test", batch)
    assert sink.flush(30) == 0


def start_stream_processor(settings: Settings, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "SENSORMINE_ENV": settings.env,
        "SENSORMINE_DATABASE_URL": settings.database_url or "",
        "SENSORMINE_DATABASE_MIGRATE_URL": settings.database_migrate_url or "",
        "SENSORMINE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "SENSORMINE_ALERTS_GROUP": settings.alerts_group,
        "SENSORMINE_CONSUMER_GROUP": settings.consumer_group,  # whose stored offsets the rebuild waits for
        "SENSORMINE_AGGREGATE_WINDOW_S": str(settings.aggregate_window_s),
        "SENSORMINE_AGGREGATE_GRACE_S": str(settings.aggregate_grace_s),
        "SENSORMINE_ALERTS_REFRESH_S": str(settings.alerts_refresh_s),
    }
    env.pop("SENSORMINE_SMTP_URL", None)
    cli = Path(sys.executable).with_name("sensormine")
    return subprocess.Popen([str(cli), "ingest", "alerts"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def committed(settings: Settings, partitions: int = 4) -> int:
    """Messages the stream processor's group has committed on the tenant's topic."""
    topic = settings.telemetry_topic("acme")
    probe = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.alerts_group})
    try:
        got = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        probe.close()
    return sum(max(tp.offset, 0) for tp in got)


def hot_rows(conn: psycopg.Connection) -> int:
    n = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
    conn.commit()
    return n


def expected_alarms(conn: psycopg.Connection, readings: list[Reading]) -> list[tuple]:
    """(rule, device, raised at, cleared at, count) of an uninterrupted, in-memory run (an alarm counts
    the instants it was seen at: two metrics read at one time are one repeat)."""
    out = []
    for rule in list_rules(conn):
        open_: dict[str, tuple[int, set[int]]] = {}
        for t in replay(rule, readings):
            if t.kind == "raise":
                open_[t.device_id] = (t.ts_us, {t.ts_us})
            elif t.kind == "update":
                open_[t.device_id][1].add(t.ts_us)
            else:
                raised, seen = open_.pop(t.device_id)
                out.append((rule.id, t.device_id, raised, t.ts_us, len(seen)))
        out += [(rule.id, device, raised, None, len(seen)) for device, (raised, seen) in open_.items()]
    return sorted(out)


@dataclass
class Scenario:
    settings: Settings
    first: list[list[Reading]]  # the envelopes published before the disruption
    second: list[list[Reading]]  # and after it
    hot: subprocess.Popen  # the hot-store consumer (`sensormine ingest consumer`)

    def stop_hot_store_consumer(self) -> None:
        if self.hot.poll() is None:
            self.hot.send_signal(signal.SIGTERM)
            assert self.hot.wait(30) == 0

    @property
    def total(self) -> int:
        return len(self.first) + len(self.second)


@pytest.fixture
def scenario(settings: Settings, conn: psycopg.Connection, tmp_path: Path) -> Iterator[Scenario]:
    """The tenant, its rules, its topic, the readings; the hot-store consumer running (the rebuild reads
    the hot store)."""
    if not settings.kafka_bootstrap:
        pytest.skip("needs Kafka (sensormine services up)")
    settings = settings.model_copy(
        update={
            "alerts_group": f"{settings.env}-alerts",
            "aggregate_window_s": 5.0,
            "aggregate_grace_s": 0.0,
            "alerts_refresh_s": 0.0,
            "smtp_url": None,
        }
    )
    make_tenant(conn, "acme", list(DEVICES))
    conn.commit()
    with psycopg.connect(settings.database_url or "") as app:
        for rule_id, rule in RULES.items():
            usecases.create_rule(app, operator_identity(app), "acme", rule_id, rule)
    ensure_topics([settings.telemetry_topic("acme")], settings=settings)
    assert len({partition_of(d.encode(), 4) for d in DEVICES}) > 1, "the devices should spread over partitions"
    now_s = int(time.time())
    base_us = (now_s - 300 - now_s % 5) * S  # recent enough for the rebuild's replay (15 min), on a window edge
    sc = Scenario(
        settings, envelopes(base_us, range(20)), envelopes(base_us, range(20, SECONDS)),
        start_consumer(settings, tmp_path / "consumer.log"),
    )  # fmt: skip
    try:
        yield sc
    finally:
        sc.stop_hot_store_consumer()


def first_half_handled(sc: Scenario, conn: psycopg.Connection, stored: int | None = None) -> None:
    """The stream processor has committed the first half; the hot store holds `stored` envelopes of it
    (all by default)."""
    stored = len(sc.first) if stored is None else stored
    wait_for(lambda: committed(sc.settings) == len(sc.first), "the first half handled and committed", 120)
    wait_for(lambda: hot_rows(conn) == 2 * stored, f"{stored} envelopes in the hot store", 60)
    raised_before = conn.execute("SELECT device_id FROM alarms ORDER BY 1").fetchall()
    conn.commit()
    assert raised_before == [("m1",), ("m3",), ("m4",)]  # m2's duration is still running


def test_sigkill_mid_window_then_restart_gives_the_uninterrupted_alarms_and_windows(
    scenario: Scenario, conn: psycopg.Connection, tmp_path: Path
) -> None:
    settings = scenario.settings
    log = tmp_path / "streamproc.log"
    procs = []
    try:
        killed = start_stream_processor(settings, log)
        procs.append(killed)
        mid = len(scenario.first) // 2  # up to second 9: m2's duration starts holding after it
        publish(settings, scenario.first[:mid])
        wait_for(lambda: hot_rows(conn) == 2 * mid, "the first quarter in the hot store", 60)
        scenario.stop_hot_store_consumer()  # and not started again: the hot store stops at second 9
        publish(settings, scenario.first[mid:])
        first_half_handled(scenario, conn, stored=mid)
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)

        publish(settings, scenario.second)
        restarted = start_stream_processor(settings, log)
        procs.append(restarted)
        wait_for(lambda: committed(settings) == scenario.total, "the second half handled and committed", 120)
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(60) == 0, log.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    assert_uninterrupted(scenario, conn)
    # The restart's rebuild: seconds 0-9 from the hot store, 10-19 (40 envelopes) read back from Kafka.
    assert "and 80 from Kafka (messages the hot store did not hold yet: 40)" in log.read_text(), log.read_text()


def test_a_member_joining_mid_window_takes_over_partitions_with_their_state(
    scenario: Scenario, conn: psycopg.Connection
) -> None:
    settings = scenario.settings
    stop = threading.Event()
    members: list[tuple[StreamProcessor, threading.Thread]] = []

    def join() -> StreamProcessor:
        member = StreamProcessor(settings)
        thread = threading.Thread(target=member.run, args=(stop,), daemon=True)
        thread.start()
        members.append((member, thread))
        return member

    try:
        a = join()
        publish(settings, scenario.first)
        first_half_handled(scenario, conn)
        assert len(a._owned) == 4
        b = join()
        wait_for(lambda: a._owned and b._owned and len(a._owned | b._owned) == 4, "the partitions shared", 90)
        publish(settings, scenario.second)
        wait_for(lambda: committed(settings) == scenario.total, "the second half handled and committed", 120)
    finally:
        stop.set()
        for member, thread in members:
            thread.join(30)
            member.close()
    assert b.stats.messages > 0 and a.stats.messages > len(scenario.first)  # both did part of the second half
    assert_uninterrupted(scenario, conn)


def assert_uninterrupted(sc: Scenario, conn: psycopg.Connection) -> None:
    """The store and the topics hold what one uninterrupted run would have produced, once each."""
    settings = sc.settings
    readings = sorted((r for batch in sc.first + sc.second for r in batch), key=lambda r: r.ts)
    expected = expected_alarms(conn, readings)
    assert {(a[0], a[1]) for a in expected} == {("overheat", "m1"), ("overheat", "m2"), ("odd", "m3"), ("odd", "m4")}

    def us(at: datetime | None) -> int | None:
        return None if at is None else round((at - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * S)

    stored = sorted(
        (rule, device, us(raised), us(cleared), count)
        for rule, device, raised, cleared, count in conn.execute(
            "SELECT rule_id, device_id, raised_at, cleared_at, count FROM alarms"
        ).fetchall()
    )
    assert stored == expected  # m2 raised 3 s after it began to hold, though the disruption fell in between

    events = Counter(conn.execute("SELECT alarm_id, kind FROM alarm_events").fetchall())
    assert set(events.values()) == {1}  # no transition stored twice
    assert len(events) == len(expected) + sum(a[3] is not None for a in expected)
    bootstrap = settings.kafka_bootstrap or ""
    published = Counter(
        (e["event"], e["rule_id"], e["device_id"])
        for e in (orjson.loads(m.value()) for m in drain_topic(bootstrap, settings.alerts_topic("acme")))
    )
    assert set(published.values()) == {1}
    assert sorted(published) == sorted(
        [("alarm.raised", a[0], a[1]) for a in expected] + [("alarm.cleared", a[0], a[1]) for a in expected if a[3]]
    )

    whole = Windows(width_s=5, grace_s=0)
    want = {a.id: (a.count, a.min, a.max) for a in whole.add(readings)}
    got = [orjson.loads(m.value()) for m in drain_topic(bootstrap, settings.aggregates_topic("acme"))]
    ids = Counter(w["id"] for w in got)
    assert set(ids.values()) == {1}, [i for i, n in ids.items() if n > 1][:5]  # no window published twice
    assert {w["id"]: (w["count"], w["min"], w["max"]) for w in got} == want  # none lost, none incomplete
    assert len(want) == len(DEVICES) * 2 * (SECONDS // 5 - 1)  # the last window of each series is still open
