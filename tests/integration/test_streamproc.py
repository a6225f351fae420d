"""The stream processor on real Kafka and PostgreSQL: telemetry topic -> alarms in the store and on
`{env}.{tenant}.alerts`, in its own consumer group; a crash before the offset commit replays the
batch and changes nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import orjson
import psycopg
import pytest

from ingest_daemons.streamproc import StreamProcessor
from sensormine.alerts import usecases
from sensormine.clients.kafka import ensure_topics
from sensormine.identity.credentials import operator_identity
from sensormine.ingest.sinks import KafkaSink
from sensormine.reading import Reading
from sensormine.settings import Settings
from tests.factories import DAY_US, drain_topic, make_tenant, wait_for

pytestmark = pytest.mark.integration

RULE = {
    "name": "Motor overheating",
    "severity": "critical",
    "condition": {"kind": "threshold", "metric": "temperature", "op": "gt", "value": 90, "hysteresis": 5},
}


def points(*values: float, start_s: int = 0) -> list[Reading]:
    return [Reading("acme", "m1", "temperature", DAY_US + (start_s + i) * 1_000_000, v) for i, v in enumerate(values)]


@pytest.fixture
def kafka(settings: Settings, conn: psycopg.Connection) -> Iterator[Settings]:
    if not settings.kafka_bootstrap:
        pytest.skip("needs Kafka (sensormine services up)")
    make_tenant(conn, "acme", ["m1"])
    conn.execute("UPDATE devices SET device_type = 'motor', metadata = '{\"site\": \"north\"}'")
    conn.commit()
    with psycopg.connect(settings.database_url or "") as app:
        usecases.create_rule(app, operator_identity(app), "acme", "overheat", RULE)
    ensure_topics([settings.telemetry_topic("acme")], settings=settings)
    yield settings.model_copy(
        update={
            "alerts_refresh_s": 0.0,
            "alerts_group": f"{settings.env}-alerts",
            "aggregate_window_s": 5.0,
            "aggregate_grace_s": 0.0,
        }
    )


def publish(settings: Settings, readings: list[Reading]) -> None:
    sink = KafkaSink(settings)
    for r in readings:  # one message per reading: batches then split anywhere
        sink.publish(r.tenant_id, r.device_id, "test", [r])
    assert sink.flush(30) == 0


def run_until(proc: StreamProcessor, done: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=proc.run, args=(done,), daemon=True)
    thread.start()
    return thread


def consumed_by_a_member(settings: Settings, readings: list[Reading]) -> tuple[StreamProcessor, list]:
    """Publish readings; a member that has consumed their messages and handled none yet."""
    publish(settings, readings)
    member = StreamProcessor(settings)
    member.consumer.subscribe([settings.telemetry_topic_pattern])
    got: list = []
    wait_for(lambda: got.extend(member.consumer.consume(100, timeout=0.5)) or len(got) >= len(readings), "the messages")
    return member, got


def run_briefly(proc: StreamProcessor, until: Callable[[], object], what: str) -> None:
    """Run a member until `until` holds, then stop and close it."""
    stop = threading.Event()
    thread = run_until(proc, stop)
    try:
        wait_for(until, what)
    finally:
        stop.set()
        thread.join(30)
        proc.close()


def alarm_rows(conn: psycopg.Connection) -> list[tuple]:
    rows = conn.execute("SELECT device_id, status, count, last_value FROM alarms ORDER BY raised_at").fetchall()
    conn.commit()
    return rows


def test_alarms_from_the_telemetry_topic_land_in_the_store_and_on_the_alerts_topic(
    kafka: Settings, conn: psycopg.Connection
) -> None:
    publish(kafka, points(80, 95, 97, 99))
    stop = threading.Event()
    proc = StreamProcessor(kafka)
    thread = run_until(proc, stop)
    try:
        wait_for(lambda: alarm_rows(conn) == [("m1", "active", 3, 99.0)], "the alarm with its repeats")
        publish(kafka, points(84, start_s=10))
        wait_for(lambda: alarm_rows(conn) == [("m1", "cleared", 3, 84.0)], "the alarm to clear")
    finally:
        stop.set()
        thread.join(30)
        proc.close()
    events = [orjson.loads(m.value()) for m in drain_topic(kafka.kafka_bootstrap or "", kafka.alerts_topic("acme"))]
    assert [(e["event"], e["device_id"], e["rule_id"], e["severity"]) for e in events] == [
        ("alarm.raised", "m1", "overheat", "critical"),
        ("alarm.cleared", "m1", "overheat", "critical"),
    ]
    assert (events[0]["device_type"], events[0]["labels"]) == ("motor", {"site": "north"})  # from the registry
    assert proc.stats.messages == 5 and proc.stats.published == 2
    assert conn.execute("SELECT count(*) FROM alarm_outbox").fetchone() == (0,)  # both confirmed
    published = drain_topic(kafka.kafka_bootstrap or "", kafka.aggregates_topic("acme"))
    windows = sorted(
        (orjson.loads(m.value()) for m in published), key=lambda w: w["window_start_us"]
    )  # keys spread over partitions
    # [0 s, 5 s) closed when the reading at 10 s came; [10 s, 15 s) is still open (a shutdown does not
    # publish it: whoever owns the partition next rebuilds it from the hot store).
    assert [(w["window_start_us"] - DAY_US, w["count"], w["min"], w["max"]) for w in windows] == [(0, 4, 80.0, 99.0)]
    assert (windows[0]["id"], windows[0]["device_type"], windows[0]["labels"]) == (
        f"m1/temperature/{DAY_US}/5000000",
        "motor",
        {"site": "north"},
    )
    assert windows[0]["avg"] == pytest.approx((80 + 95 + 97 + 99) / 4) and windows[0]["rate_per_s"] == pytest.approx(
        19 / 3
    )


def test_a_crash_before_the_offset_commit_replays_the_batch_and_changes_nothing(
    kafka: Settings, conn: psycopg.Connection
) -> None:
    crashed, got = consumed_by_a_member(kafka, points(95, 96, 97))

    class KilledBeforeCommit:
        """The real consumer, except that the process dies where it would commit."""

        def __init__(self, inner: object) -> None:
            self.inner = inner

        def commit(self, *_: object, **__: object) -> None:
            raise RuntimeError("killed before the commit")

    real = crashed.consumer
    crashed.consumer = KilledBeforeCommit(real)  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="killed"):
        crashed.process(got)
    assert alarm_rows(conn) == [("m1", "active", 3, 97.0)]
    crashed.processor.close()
    crashed.producer.flush(30)
    real.close()  # leaves the group without having committed anything

    again = StreamProcessor(kafka)
    run_briefly(again, lambda: again.stats.messages >= 3, "the replayed batch")
    assert alarm_rows(conn) == [("m1", "active", 3, 97.0)]  # no second alarm, no extra repeats
    assert again.stats.raised == 0 and again.stats.published == 0
    events = conn.execute("SELECT kind, actor FROM alarm_events").fetchall()
    assert events == [("raised", "rule")]
    published = drain_topic(kafka.kafka_bootstrap or "", kafka.alerts_topic("acme"))
    assert [orjson.loads(m.value())["event"] for m in published] == ["alarm.raised"]


def test_an_alarm_event_lost_with_the_process_is_published_from_the_outbox(
    kafka: Settings, conn: psycopg.Connection
) -> None:
    crashed, got = consumed_by_a_member(kafka, points(95, 96, 97))

    def killed(*_: object, **__: object) -> None:
        raise RuntimeError("killed after the commit, before Kafka confirmed the event")

    crashed._publish = killed  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="killed"):
        crashed.process(got)
    assert alarm_rows(conn) == [("m1", "active", 3, 97.0)]
    assert conn.execute("SELECT kind, attempts FROM alarm_outbox").fetchall() == [("raised", 0)]
    conn.commit()
    crashed.processor.close()
    crashed.consumer.close()  # nothing committed: the batch comes again, and changes nothing

    again = StreamProcessor(kafka.model_copy(update={"alerts_outbox_retry_s": 0.5}))
    run_briefly(
        again, lambda: again.stats.published == 1 and again.stats.messages >= 3, "the outbox's event and the replay"
    )
    assert again.stats.raised == 0  # the replay raised nothing new: the event came from the outbox
    assert conn.execute("SELECT count(*) FROM alarm_outbox").fetchone() == (0,)
    events = [orjson.loads(m.value()) for m in drain_topic(kafka.kafka_bootstrap or "", kafka.alerts_topic("acme"))]
    assert [(e["event"], e["value"]) for e in events] == [("alarm.raised", 97.0)]


def test_readings_the_hot_store_rejects_raise_no_alarm(kafka: Settings, conn: psycopg.Connection) -> None:
    from sensormine.schemas.store import register_schema

    schema = {"type": "object", "properties": {"values": {"properties": {"temperature": {"maximum": 150}}}}}
    register_schema(conn, "acme", "motor", schema)
    conn.commit()
    # 900 breaks the motor schema (a broken sensor, not a hot motor); 95 then raises as usual.
    publish(kafka, points(80, 900, 95, start_s=0))
    proc = StreamProcessor(kafka)
    run_briefly(proc, lambda: proc.stats.messages >= 3, "the messages")
    assert proc.stats.rejected == 1
    assert alarm_rows(conn) == [("m1", "active", 1, 95.0)]  # raised at 95, not at 900
