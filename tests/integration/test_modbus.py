"""The Modbus daemon against the pymodbus simulator, into Kafka and the hot store (real services)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from pymodbus.client import ModbusTcpClient

from ingest_daemons.consumer import HotStoreConsumer
from ingest_daemons.modbus import ModbusDaemon
from ingest_daemons.simulators.modbus_server import SimulatorThread
from sensormine.clients.kafka import ensure_topics
from sensormine.devices.profiles import ModbusPoint, delete_profile, set_profile
from sensormine.reading import QUALITY_BAD, QUALITY_GOOD
from sensormine.settings import Settings
from tests.factories import make_tenant, wait_until

pytestmark = pytest.mark.integration


def words(fmt: str, value: float, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """Registers of a value, built from its big-endian image: bytes swapped per register, then registers reversed."""
    image = struct.pack(">" + fmt, value)
    pairs = [image[i : i + 2] for i in range(0, len(image), 2)]
    if byte_order == "little":
        pairs = [p[::-1] for p in pairs]
    if word_order == "little":
        pairs = pairs[::-1]
    return [p[0] << 8 | p[1] for p in pairs]


def f32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


# What the static simulator's registers must hold, computed here, independently of the codec.
HOLDING = [
    *words("f", 47.3),  # 0-1 motor.temperature ABCD
    *words("f", 2.71828, word_order="little"),  # 2-3 motor.vibration CDAB
    *words("i", 14805, "little", "little"),  # 4-5 motor.rpm DCBA, 0.1 rpm
    *words("h", -427, "little"),  # 6 motor.torque BA, 0.1 N·m
    *words("I", 123_456_789, "little"),  # 7-8 motor.run_hours BADC, seconds
    0,  # 9 reserved
    1,  # 10 motor.status
]
INPUT = [
    6327,  # tank.level, 0.01 %
    2932,  # tank.temperature, 0.1 K
    *words("h", 1617),  # tank.pressure, mbar
    *words("d", 12.345678901234),  # 3-6 tank.volume
    *words("d", -0.0035, "little", "little"),  # 7-10 tank.flow
]
EXPECTED = {
    "motor.temperature": f32(47.3),
    "motor.vibration": f32(2.71828),
    "motor.rpm": 14805 * 0.1,
    "motor.torque": -427 * 0.1,
    "motor.run_hours": 123_456_789 * (1 / 3600),
    "motor.status": 1.0,
    "tank.level": 6327 * 0.01,
    "tank.temperature": 2932 * 0.1 - 273.15,
    "tank.pressure": 1617 * 0.001,
    "tank.volume": 12.345678901234,
    "tank.flow": -0.0035,
    "motor.running": 1.0,
    "tank.high_alarm": 0.0,
    "tank.low_alarm": 0.0,
    "tank.inlet_open": 1.0,
}


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    sim = SimulatorThread(static=True, stall_s=2.0).start()
    yield sim
    sim.stop()


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(conn: psycopg.Connection, device_id: str) -> list[tuple[str, int, float, int]]:
    """(metric, ts µs, value, quality) of a device, by ts then metric."""
    return conn.execute(
        "SELECT metric, (extract(epoch FROM ts) * 1000000)::bigint, value, quality FROM telemetry "
        "WHERE device_id = %s ORDER BY ts, metric",
        (device_id,),
    ).fetchall()


def polls(daemon: ModbusDaemon, device_id: str) -> int:
    """Polls of an acme device so far; 0 until the daemon has picked up its profile."""
    try:
        return daemon.device_stats("acme", device_id).polls
    except KeyError:
        return 0


def test_simulator_registers_hold_the_documented_contents(simulator: SimulatorThread) -> None:
    client = ModbusTcpClient("127.0.0.1", port=simulator.port, timeout=2)
    assert client.connect()
    try:
        assert client.read_holding_registers(0, count=11, device_id=1).registers == HOLDING
        assert client.read_input_registers(0, count=11, device_id=1).registers == INPUT
        assert client.read_coils(0, count=1, device_id=1).bits[0] is True
        assert client.read_discrete_inputs(0, count=3, device_id=1).bits[:3] == [False, False, True]
        assert client.read_holding_registers(11, count=1, device_id=1).exception_code == 2  # past the map
    finally:
        client.close()


def test_simulator_to_hot_store_through_kafka(
    settings: Settings, conn: psycopg.Connection, simulator: SimulatorThread
) -> None:
    make_tenant(conn, "acme", ["pump-1"])
    ensure_topics([settings.telemetry_topic("acme"), settings.dlq_topic], settings=settings)
    set_profile(conn, "acme", "pump-1", simulator.simulator.profile(poll_interval_ms=50))
    daemon = ModbusDaemon(settings, profile_refresh_s=0.5).start()
    try:
        assert wait_until(lambda: polls(daemon, "pump-1") >= 6)
    finally:
        daemon.stop()
    stats = daemon.device_stats("acme", "pump-1")
    assert (stats.bad, stats.io_errors, stats.exceptions) == (0, 0, 0)
    # Holding, input, coils, discrete inputs: one read each per poll. Polls still in flight when
    # stop() cancels them may have sent reads without being counted as polls (at most two here,
    # 50 ms apart); without batching it would be 15 reads a poll.
    assert 4 * stats.polls <= stats.requests <= 4 * (stats.polls + 2)

    consumer = HotStoreConsumer(settings)
    try:
        consumer.run(threading.Event(), idle_exit_s=2.0)
    finally:
        consumer.close()

    got = rows(conn, "pump-1")
    assert len(got) == stats.polls * len(EXPECTED) == daemon.stats.sink.published_readings
    assert {q for _, _, _, q in got} == {QUALITY_GOOD}
    assert len({ts for _, ts, _, _ in got}) == stats.polls  # one timestamp per poll, shared by its points
    values: dict[str, set[float]] = {}
    for metric, _, value, _ in got:
        values.setdefault(metric, set()).add(value)
    assert values == {metric: {value} for metric, value in EXPECTED.items()}
    assert values["motor.temperature"] == {47.29999923706055}  # float32, not the 47.3 it was meant to be


def test_failures_become_bad_readings_and_the_daemon_keeps_polling(
    settings: Settings, conn: psycopg.Connection, simulator: SimulatorThread
) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["ghost", "stuck", "partial"])
    fast = {"poll_interval_ms": 50, "timeout_ms": 200}
    set_profile(conn, "acme", "ghost", simulator.simulator.profile(port=free_port(), **fast))
    stuck = SimulatorThread(static=True, stall_s=2.0).start()
    partial_points = [
        ModbusPoint(metric="motor.status", address=10, data_type="bool"),
        ModbusPoint(metric="bogus", address=11, data_type="uint16"),  # past the register map
    ]
    try:
        set_profile(conn, "acme", "stuck", stuck.simulator.profile(**fast))
        set_profile(conn, "acme", "partial", simulator.simulator.profile(points=partial_points, **fast))
        daemon = ModbusDaemon(direct, profile_refresh_s=0.5).start()
        try:
            st = daemon.device_stats("acme", "stuck")
            assert wait_until(lambda: st.good >= 3 * 15)
            stuck.set_stall(True)  # answers now come 2 s late: past the 200 ms timeout
            assert wait_until(lambda: st.io_errors >= 2 and st.bad >= 2 * 15)
            stuck.set_stall(False)
            good_before = st.good
            assert wait_until(lambda: st.good >= good_before + 2 * 15)
            partial = daemon.device_stats("acme", "partial")
            assert wait_until(lambda: partial.polls >= 3 and polls(daemon, "ghost") >= 3)
            assert all(not task.done() for _, task in daemon.pollers.values())
        finally:
            daemon.stop()
    finally:
        stuck.stop()

    ghost = daemon.device_stats("acme", "ghost")
    assert (ghost.good, ghost.bad, ghost.connects) == (0, 0, 0) and ghost.connect_failures >= 1
    # Never read, so no last value to hold: counted, not published.
    assert ghost.skipped == ghost.polls * 15
    assert rows(conn, "ghost") == []

    stuck_rows = rows(conn, "stuck")
    st = daemon.device_stats("acme", "stuck")
    assert len(stuck_rows) == st.polls * 15 == st.good + st.bad and st.skipped == 0
    qualities = [q for m, _, _, q in stuck_rows if m == "motor.temperature"]
    # good, then bad while stalled, then good again
    first_bad, last_bad = qualities.index(QUALITY_BAD), len(qualities) - 1 - qualities[::-1].index(QUALITY_BAD)
    assert set(qualities[:first_bad]) == {QUALITY_GOOD} and set(qualities[last_bad + 1 :]) == {QUALITY_GOOD}
    assert first_bad >= 3 and len(qualities) - last_bad > 2
    # A bad reading carries the point's last good value.
    assert {v for m, _, v, q in stuck_rows if q == QUALITY_BAD and m == "motor.temperature"} == {f32(47.3)}
    assert {v for m, _, v, q in stuck_rows if q == QUALITY_BAD and m == "motor.rpm"} == {1480.5}

    partial = daemon.device_stats("acme", "partial")
    partial_rows = rows(conn, "partial")
    assert partial.exceptions >= partial.polls  # the batch once, then "bogus" alone on every later poll
    # The first poll read both points in one batch, which the device refused: nothing read yet, so
    # nothing published. From then on they are read apart: status is good, bogus never has a value.
    assert (partial.good, partial.bad, partial.skipped) == (partial.polls - 1, 0, partial.polls + 1)
    assert [(m, v, q) for m, _, v, q in partial_rows] == [("motor.status", 1.0, QUALITY_GOOD)] * (partial.polls - 1)


def test_profile_edits_are_picked_up_live(
    settings: Settings, conn: psycopg.Connection, simulator: SimulatorThread
) -> None:
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    make_tenant(conn, "acme", ["pump-1", "pump-2"])
    sim = simulator.simulator
    first = set_profile(
        conn,
        "acme",
        "pump-1",
        sim.profile(
            points=[ModbusPoint(metric="motor.temperature", address=0, data_type="float32")], poll_interval_ms=50
        ),
    )
    daemon = ModbusDaemon(direct, profile_refresh_s=0.2).start()
    try:
        pump1 = daemon.device_stats("acme", "pump-1")
        assert wait_until(lambda: pump1.polls >= 2)
        edited = sim.profile(
            points=[
                ModbusPoint(metric="tank.level", table="input", address=0, scale=0.01),
                ModbusPoint(metric="motor.rpm", address=4, data_type="int32", byte_order="little", word_order="little"),
            ],
            poll_interval_ms=50,
        )
        second = set_profile(conn, "acme", "pump-1", edited)
        assert second.revision > first.revision
        # The daemon swaps the device's poller on an edit: between removal and start the key is absent.
        assert wait_until(
            lambda: getattr(daemon.pollers.get(("acme", "pump-1"), [None])[0], "revision", 0) == second.revision
        )
        polls_at_edit = pump1.polls
        assert wait_until(lambda: pump1.polls >= polls_at_edit + 2)

        set_profile(conn, "acme", "pump-2", sim.profile(poll_interval_ms=50))  # a new device
        assert wait_until(lambda: polls(daemon, "pump-2") >= 2)

        assert delete_profile(conn, "acme", "pump-1")
        assert wait_until(lambda: ("acme", "pump-1") not in daemon.pollers)
        polls_after_delete = pump1.polls
        time.sleep(0.3)
        assert pump1.polls == polls_after_delete
    finally:
        daemon.stop()

    got = rows(conn, "pump-1")
    before = [(ts, v) for m, ts, v, _ in got if m == "motor.temperature"]
    after = [(ts, m, v) for m, ts, v, _ in got if m != "motor.temperature"]
    polls_after = len({ts for ts, _, _ in after})
    # Every poll landed: one point each under the first profile, two under the edited one.
    assert len(before) + polls_after == pump1.polls and len(after) == 2 * polls_after
    assert len(before) >= 2 and polls_after >= 2
    assert {v for _, v in before} == {f32(47.3)}
    assert max(ts for ts, _ in before) < min(ts for ts, _, _ in after)
    assert {(m, v) for _, m, v in after} == {("tank.level", 63.27), ("motor.rpm", 14805.0)}  # rpm now unscaled
    assert len(rows(conn, "pump-2")) == daemon.device_stats("acme", "pump-2").polls * 15
