"""The OPC UA daemon against the asyncua simulator, into the hot store.

The first three tests go through Kafka and the consumer; the others (statuses, a failing device,
credentials, certificates) take the in-process path (no Kafka), which shares the validation and write.

The simulator runs deterministically (seeded) and is ticked by the test; its history of writes is
the ground truth. OPC UA reports changes, not samples: a write that repeats the previous value and
status produces no notification, so expectations skip those, and a Bad status (which carries no
value) is stored with the node's last value and quality bad (docs/opcua.md).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import psycopg
import pytest
from asyncua import ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.opcua import Backoff, OpcUaDaemon, OpcUaOptions
from ingest_daemons.simulators.opcua_server import DROPOUT_STATUS, SimulatorConfig, SimulatorThread, Written
from sensormine.clients.kafka import ensure_topics
from sensormine.devices.profiles import set_profile
from sensormine.reading import datetime_to_us
from sensormine.settings import Settings
from tests.factories import drain_topic, make_tenant, wait_until

pytestmark = pytest.mark.integration

# Nodes are sampled at 1 ms with a 50 ms publishing interval: the monitored items' queues then hold
# 100 values, so a daemon slowed down by a busy machine still loses nothing while the test ticks.
FAST = OpcUaOptions(
    profile_poll_s=0.3, backoff=Backoff(initial_s=0.2, max_s=1.0), watchdog_s=0.3, request_timeout_s=5.0
)
QUALITY = {0: 0, DROPOUT_STATUS: 2}  # the statuses the simulator writes, as Reading qualities
Row = tuple[str, str, int, float, int]  # device, metric, ts µs, value, quality


def expected_rows(history: list[Written], nodes: dict[str, tuple[str, str]], from_tick: int = 0) -> list[Row]:
    """What subscribers to `nodes` (node id -> device, metric) must store, given what was written.

    A subscription made at `from_tick` first reports the value current then, i.e. written at that tick.
    """
    reported: dict[str, tuple[object, int]] = {}
    last_value: dict[str, float] = {}
    rows: list[Row] = []
    for w in history:
        if w.node_id not in nodes or w.tick < from_tick:
            continue
        if reported.get(w.node_id) == (w.value, w.status):
            continue  # no change: the server sends nothing
        reported[w.node_id] = (w.value, w.status)
        if w.value is None:  # Bad: stored with the last value, if there is one
            if w.node_id not in last_value:
                continue
            value = last_value[w.node_id]
        else:
            assert isinstance(w.value, float)
            value = last_value[w.node_id] = w.value
        device, metric = nodes[w.node_id]
        rows.append((device, metric, w.ts_us, value, QUALITY[w.status]))
    return sorted(rows)


def stored_rows(conn: psycopg.Connection, tenant_id: str) -> list[Row]:
    rows = conn.execute(
        "SELECT device_id, metric, ts, value, quality FROM telemetry WHERE tenant_id = %s", (tenant_id,)
    ).fetchall()
    conn.commit()
    return sorted((d, m, datetime_to_us(ts), v, q) for d, m, ts, v, q in rows)


def count_rows(conn: psycopg.Connection) -> int:
    n = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
    conn.commit()
    return n


@contextmanager
def running_consumer(settings: Settings, tenants: list[str]) -> Iterator[HotStoreConsumer]:
    """The Kafka -> hot store consumer, running on a thread for the duration."""
    ensure_topics([*(settings.telemetry_topic(t) for t in tenants), settings.dlq_topic], settings=settings)
    consumer = HotStoreConsumer(settings)
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        stop.set()
        thread.join(30)
        consumer.close()


@contextmanager
def running_daemon(settings: Settings, options: OpcUaOptions = FAST) -> Iterator[OpcUaDaemon]:
    daemon = OpcUaDaemon(settings, options=options).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def node_map(
    sim: SimulatorThread, devices: list[str], skip: tuple[str, ...] = ("state",)
) -> dict[str, tuple[str, str]]:
    """Node id -> (device, metric) for the simulated devices' signals, registry device = simulated device."""
    ids = sim.sim.node_ids()
    return {nid: (d, signal) for d in devices for signal, nid in ids[d].items() if signal not in skip}


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    config = SimulatorConfig(seed=7, record=True, dropout_rate=0.05, spike_rate=0.05)
    with SimulatorThread(config) as s:
        yield s


def test_deterministic_run_lands_exactly_in_the_hot_store(
    settings: Settings, conn: psycopg.Connection, sim: SimulatorThread
) -> None:
    make_tenant(conn, "acme", ["motor-1", "tank-1"])
    motor = sim.sim.profile("motor-1", sampling_interval_ms=1)
    motor["nodes"].append({"node_id": sim.sim.node_ids()["motor-1"]["state"], "metric": "state"})  # a String
    set_profile(conn, "acme", "motor-1", {**motor, "publishing_interval_ms": 50})
    set_profile(
        conn, "acme", "tank-1", {**sim.sim.profile("tank-1", sampling_interval_ms=1), "publishing_interval_ms": 50}
    )
    conn.commit()
    nodes = node_map(sim, ["motor-1", "tank-1"])
    with running_consumer(settings, ["acme"]), running_daemon(settings) as daemon:
        assert daemon.wait_connected(15)
        assert wait_until(lambda: daemon.stats().readings == len(nodes))  # the current values come first
        sim.tick(40, pause_s=0.02)
        expected = expected_rows(sim.sim.history, nodes)
        assert wait_until(lambda: daemon.stats().readings == len(expected))
        daemon.stop()  # flushes to Kafka
        assert wait_until(lambda: count_rows(conn) == len(expected), 30)
        stats = daemon.stats()

    assert stored_rows(conn, "acme") == expected
    assert len(expected) > 150  # 6 signals: 1 + 40 ticks of values, less repeats
    bad = [r for r in expected if r[4] == 2]
    assert bad, "seed 7 drops out some values"
    for device, metric, ts, value, _ in bad:  # a Bad status holds the last value before it
        before = [r for r in expected if r[:2] == (device, metric) and r[2] < ts and r[4] == 0]
        assert value == before[-1][3]
    # The String node: every change went to the dead-letter queue, nothing to the hot store.
    state_changes = [w for w in sim.sim.history if w.node_id.endswith("motor-1.state")]
    distinct = [w for i, w in enumerate(state_changes) if i == 0 or w.value != state_changes[i - 1].value]
    assert stats.rejected == len(distinct)
    dlq = drain_topic(settings.kafka_bootstrap, settings.dlq_topic, idle_s=1.0)
    assert len(dlq) == len(distinct)
    headers = dict(dlq[0].headers())
    assert headers["reason"] == b"non-numeric value of type str"
    assert headers["source"] == b"opcua" and headers["device_id"] == b"motor-1"
    body = orjson.loads(dlq[0].value())
    assert body["metric"] == "state" and body["value"] == "running" and body["status"] == "Good"


def test_server_restart_mid_run_reconnects_and_readings_continue(
    settings: Settings, conn: psycopg.Connection, sim: SimulatorThread
) -> None:
    make_tenant(conn, "acme", ["tank-1"])
    set_profile(
        conn, "acme", "tank-1", {**sim.sim.profile("tank-1", sampling_interval_ms=1), "publishing_interval_ms": 50}
    )
    conn.commit()
    nodes = node_map(sim, ["tank-1"])
    with running_consumer(settings, ["acme"]), running_daemon(settings) as daemon:
        assert daemon.wait_connected(15)
        sim.tick(10, pause_s=0.02)
        restart_tick = sim.sim.tick_no
        # Restart once the ticks so far are delivered: a value written in the last publishing
        # interval before a server dies is never notified (a limit of OPC UA subscriptions, see
        # docs/opcua.md); what this test checks is the reconnect and what follows it.
        before = len(expected_rows(sim.sim.history, nodes))
        assert wait_until(lambda: daemon.stats().notifications >= before, 15)
        sim.restart(down_s=1.5)  # gone for longer than the first backoff steps
        status = daemon.status("acme", "tank-1")
        assert status is not None
        assert wait_until(lambda: status.connects == 2 and status.state == "connected", 20)
        assert status.failures >= 1  # at least one attempt found the server down
        sim.tick(10, pause_s=0.02)
        expected = expected_rows(sim.sim.history, nodes)
        assert wait_until(lambda: count_rows(conn) == len(expected), 30)

    rows = stored_rows(conn, "acme")
    assert rows == expected
    after = [r for r in rows if r[2] > sim.sim.history[0].ts_us + restart_tick * 1_000_000]
    assert len(after) >= 10  # both signals kept coming after the restart


def test_profile_edit_is_picked_up_live(settings: Settings, conn: psycopg.Connection, sim: SimulatorThread) -> None:
    make_tenant(conn, "acme", ["motor-1"])
    ids = sim.sim.node_ids()["motor-1"]
    temperature = {"node_id": ids["temperature"], "metric": "temperature", "sampling_interval_ms": 1}
    base = {"protocol": "opcua", "endpoint": sim.sim.endpoint, "publishing_interval_ms": 50}
    set_profile(conn, "acme", "motor-1", {**base, "nodes": [temperature]})
    conn.commit()
    with running_consumer(settings, ["acme"]), running_daemon(settings) as daemon:
        assert daemon.wait_connected(15)
        sim.tick(5, pause_s=0.02)
        set_profile(
            conn,
            "acme",
            "motor-1",
            {**base, "nodes": [temperature, {"node_id": ids["rpm"], "metric": "rpm", "sampling_interval_ms": 1}]},
        )
        conn.commit()
        status = daemon.status("acme", "motor-1")
        assert status is not None
        assert wait_until(lambda: status.subscribes == 2 and status.state == "connected")
        added_at = sim.sim.tick_no
        sim.tick(5, pause_s=0.02)
        expected = sorted(
            expected_rows(sim.sim.history, {ids["temperature"]: ("motor-1", "temperature")})
            + expected_rows(sim.sim.history, {ids["rpm"]: ("motor-1", "rpm")}, from_tick=added_at)
        )
        assert wait_until(lambda: count_rows(conn) == len(expected), 30)
        assert status.connects == 1  # same endpoint: re-subscribed on the open connection

    assert stored_rows(conn, "acme") == expected
    assert {r[1] for r in expected} == {"temperature", "rpm"}


def test_bad_and_uncertain_statuses_become_qualities(settings: Settings, conn: psycopg.Connection) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})  # the in-process path
    make_tenant(conn, "acme", ["tank-1"])
    with SimulatorThread(SimulatorConfig(seed=3, record=True, dropout_rate=0, spike_rate=0)) as sim:
        level = sim.sim.node_ids()["tank-1"]["level"]
        profile = {"protocol": "opcua", "endpoint": sim.sim.endpoint, "nodes": [{"node_id": level, "metric": "level"}]}
        set_profile(conn, "acme", "tank-1", {**profile, "publishing_interval_ms": 50})
        conn.commit()
        with running_daemon(direct) as daemon:
            assert daemon.wait_connected(15)
            assert wait_until(lambda: count_rows(conn) == 1)
            sim.call(sim.sim.set_status(level, ua.StatusCodes.BadSensorFailure))
            assert wait_until(lambda: count_rows(conn) == 2)
            sim.call(sim.sim.set_status(level, ua.StatusCodes.UncertainLastUsableValue, 41.25))
            assert wait_until(lambda: count_rows(conn) == 3)
            sim.call(sim.sim.set_status(level, ua.StatusCodes.Good, 42.5))
            assert wait_until(lambda: count_rows(conn) == 4)
        written = [w for w in sim.sim.history if w.node_id == level]
    good = written[0]
    rows = stored_rows(conn, "acme")
    assert [(r[2], r[3], r[4]) for r in rows] == [
        (good.ts_us, good.value, 0),
        (written[1].ts_us, good.value, 2),  # Bad: no value from the server, the last one held
        (written[2].ts_us, 41.25, 1),
        (written[3].ts_us, 42.5, 0),
    ]


def test_a_failing_device_does_not_stop_the_others(settings: Settings, conn: psycopg.Connection) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["tank-1", "ghost-1"])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with SimulatorThread(SimulatorConfig(seed=5, record=True, dropout_rate=0, spike_rate=0)) as sim:
        set_profile(conn, "acme", "tank-1", {**sim.sim.profile("tank-1"), "publishing_interval_ms": 50})
        ghost = {**sim.sim.profile("tank-1"), "endpoint": f"opc.tcp://127.0.0.1:{dead_port}/nothing"}
        set_profile(conn, "acme", "ghost-1", ghost)
        conn.commit()
        with running_daemon(direct) as daemon:
            good, dead = daemon.status("acme", "tank-1"), daemon.status("acme", "ghost-1")
            assert good is not None and dead is not None
            assert wait_until(lambda: good.state == "connected" and dead.failures >= 2)
            sim.tick(5, pause_s=0.02)
            assert wait_until(lambda: count_rows(conn) == 2 * 6)
            assert dead.connects == 0 and dead.last_error is not None
            # Removing the broken profile stops its retries; the good device is untouched.
            conn.execute("DELETE FROM device_profiles WHERE device_id = 'ghost-1'")
            conn.commit()
            assert wait_until(lambda: daemon.status("acme", "ghost-1") is None)
            assert good.connects == 1


def test_username_and_password(settings: Settings, conn: psycopg.Connection) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["tank-1", "tank-x"])
    config = SimulatorConfig(seed=5, dropout_rate=0, spike_rate=0, users={"ingest": "s3cret"})
    with SimulatorThread(config) as sim:
        profile = {**sim.sim.profile("tank-1"), "publishing_interval_ms": 50}
        set_profile(conn, "acme", "tank-1", {**profile, "username": "ingest", "password": "s3cret"})
        set_profile(conn, "acme", "tank-x", {**profile, "username": "ingest", "password": "wrong"})
        conn.commit()
        with running_daemon(direct) as daemon:
            ok, refused = daemon.status("acme", "tank-1"), daemon.status("acme", "tank-x")
            assert ok is not None and refused is not None
            assert wait_until(lambda: ok.state == "connected" and refused.failures >= 1)
            assert wait_until(lambda: count_rows(conn) == 2)
            assert refused.connects == 0
            assert "BadUserAccessDenied" in (refused.last_error or "") or "Denied" in (refused.last_error or "")


def test_sign_and_encrypt_with_certificates(settings: Settings, conn: psycopg.Connection, tmp_path: Path) -> None:
    host = socket.gethostname()
    pairs = {}
    for who, uri, use in (
        ("server", "urn:freeopcua:python:server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", "urn:sensormine:ingest:opcua", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key, cert = tmp_path / f"{who}-key.pem", tmp_path / f"{who}-cert.der"
        asyncio.run(setup_self_signed_certificate(key, cert, uri, host, [use], {}))
        pairs[who] = (str(cert), str(key))
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["tank-1"])
    config = SimulatorConfig(
        seed=5, dropout_rate=0, spike_rate=0, certificate_path=pairs["server"][0], private_key_path=pairs["server"][1]
    )
    with SimulatorThread(config) as sim:
        secured = {
            **sim.sim.profile("tank-1"),
            "publishing_interval_ms": 50,
            "security_mode": "SignAndEncrypt",
            "security_policy": "Basic256Sha256",
            "certificate_path": pairs["client"][0],
            "private_key_path": pairs["client"][1],
        }
        set_profile(conn, "acme", "tank-1", secured)
        conn.commit()
        with running_daemon(direct) as daemon:
            status = daemon.status("acme", "tank-1")
            assert status is not None
            assert wait_until(lambda: status.state == "connected"), status.last_error
            assert wait_until(lambda: count_rows(conn) == 2)
