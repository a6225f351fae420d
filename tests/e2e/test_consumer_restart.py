"""SIGKILL the consumer mid-stream and restart it: every reading lands exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psycopg
import pytest

from sensormine.clients.hotstore import stored_offsets
from sensormine.clients.kafka import ensure_topics
from sensormine.ingest.sinks import KafkaSink
from sensormine.settings import Settings
from tests.conftest import admin_url_of
from tests.factories import DAY_US, make_tenant, readings, wait_until

pytestmark = pytest.mark.e2e

MESSAGES = 400
PER_MESSAGE = 250  # 125 timestamps x 2 metrics


def start_consumer(settings: Settings, log_path) -> subprocess.Popen:
    env = {
        **os.environ,
        "SENSORMINE_ENV": settings.env,
        "SENSORMINE_DATABASE_URL": settings.database_url,
        "SENSORMINE_DATABASE_MIGRATE_URL": settings.database_migrate_url,
        "SENSORMINE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SENSORMINE_CONSUMER_GROUP": settings.consumer_group,
        "SENSORMINE_CONSUMER_BATCH_SIZE": "2000",  # small batches so the kill lands mid-stream
    }
    return subprocess.Popen(
        [sys.executable, "-m", "ingest_daemons.consumer"], env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
    )


def wait_for_rows(conn: psycopg.Connection, predicate, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        conn.commit()
        if predicate(n):
            return n
        time.sleep(0.05)
    return n


def publish_stream(settings: Settings, conn: psycopg.Connection, midway: Callable[[], None]) -> int:
    """Publish MESSAGES envelopes while a consumer works; once it has written rows, call `midway`
    (the disruption) and keep publishing. Returns the readings published."""
    sink = KafkaSink(settings)
    expected = 0
    for m in range(MESSAGES):
        device = f"d{m % 8}"
        batch = readings("acme", device, PER_MESSAGE // 2, start_us=DAY_US + (m // 8) * 125_000_000)
        sink.publish("acme", device, "test", batch)
        expected += len(batch)
        sink.producer.poll(0.004)
        if m == MESSAGES // 2:
            sink.flush(30)
            assert wait_for_rows(conn, lambda n: n > 0, timeout=60) > 0  # the consumer is writing
            midway()
    assert sink.flush(30) == 0
    return expected


def _stopped_stats(log_text: str) -> list[dict[str, int]]:
    """The counters each consumer process logged when it stopped (a SIGKILLed one logs none)."""
    return [
        {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        for line in log_text.splitlines()
        if "stopped: messages=" in line
    ]


def test_sigkill_mid_stream_loses_and_doubles_nothing(settings: Settings, conn: psycopg.Connection, tmp_path) -> None:
    make_tenant(conn, "acme", [f"d{i}" for i in range(8)])
    topic = settings.telemetry_topic("acme")
    ensure_topics([topic], settings=settings)
    log = tmp_path / "consumer.log"
    first = start_consumer(settings, log)
    second: subprocess.Popen | None = None
    committed_by_first = 0

    locked = threading.Event()
    failures: list[str] = []

    def kill_inside_a_transaction() -> None:
        """SIGKILL the consumer while a batch's rows are written but its transaction is still open.

        The consumer COPYs a batch's rows and then stores its offsets in the same transaction; holding
        a lock on ingest_offsets stops it in between, and the kill lands there.
        """
        nonlocal second, committed_by_first
        url = admin_url_of(settings)
        with psycopg.connect(url) as blocker, psycopg.connect(url, autocommit=True) as watch:
            blocker.execute("LOCK TABLE ingest_offsets IN ACCESS EXCLUSIVE MODE")
            locked.set()  # the publisher goes on, so the consumer gets a next batch
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE '%ingest_offsets%'"
            )
            if not wait_until(lambda: watch.execute(waiting).fetchone()[0] == 1, timeout=60):
                failures.append("the consumer never reached its offset write")
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            blocker.rollback()
            committed_by_first = sum(stored_offsets(watch, settings.consumer_group).values())
        second = start_consumer(settings, log)

    killer = threading.Thread(target=kill_inside_a_transaction)

    def midway() -> None:
        killer.start()
        assert locked.wait(30)

    try:
        expected = publish_stream(settings, conn, midway)
        killer.join(90)
        assert not failures, failures
        final = wait_for_rows(conn, lambda n: n >= expected, timeout=120)
        assert wait_until(lambda: sum(stored_offsets(conn, settings.consumer_group).values()) == MESSAGES, 60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)

    assert final == expected, log.read_text()[-3000:]
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == expected
    distinct = conn.execute("SELECT count(*) FROM (SELECT DISTINCT device_id, metric, ts FROM telemetry) s").fetchone()[
        0
    ]
    assert distinct == expected
    offsets = stored_offsets(conn, settings.consumer_group)
    assert sum(offsets.values()) == MESSAGES  # resumed from the database's offsets, to the last message
    # Upstream of the dedupe key: the restarted consumer read exactly the messages the first had not
    # committed (the killed batch included, its rows rolled back) and met no row already stored.
    [after_restart] = _stopped_stats(log.read_text())
    assert 0 < committed_by_first < MESSAGES
    assert after_restart["messages"] == MESSAGES - committed_by_first
    assert after_restart["duplicates"] == 0 and after_restart["inserted"] == after_restart["readings"]


def test_lost_database_connection_is_survived(settings: Settings, conn: psycopg.Connection, tmp_path) -> None:
    make_tenant(conn, "acme", [f"d{i}" for i in range(8)])
    ensure_topics([settings.telemetry_topic("acme")], settings=settings)
    log = tmp_path / "consumer.log"
    proc = start_consumer(settings, log)

    def cut_connections() -> None:
        # Cut the consumer's database connections, as a failover or a restart would.
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
        conn.commit()
        assert killed >= 1

    try:
        expected = publish_stream(settings, conn, cut_connections)
        final = wait_for_rows(conn, lambda n: n >= expected, timeout=120)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    output = log.read_text()
    assert "starting over" in output  # the failure was noticed, not silently absorbed
    assert final == expected, output[-3000:]
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == expected
    assert sum(stored_offsets(conn, settings.consumer_group).values()) == MESSAGES
