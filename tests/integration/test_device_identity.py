"""Broker-level device identity through a real Mosquitto with its dynamic-security plugin.

The module starts its own Mosquitto through the launcher (a private state dir), so it can restart
and prune it without disturbing anyone else's broker; PostgreSQL comes from the session's services.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import psycopg
import pytest
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner, Result

from cli.main import app
from ingest_daemons.mqtt import MqttDaemon
from ingest_daemons.simulators.mqtt_publisher import run as run_simulator
from sensormine.clients.dynsec import DEVICE_TEXTNAME, Dynsec, DynsecError, device_rolename, device_username
from sensormine.clients.mqtt import MqttConnectError, make_client, telemetry_topic
from sensormine.devices.registry import (
    BrokerUpdate,
    create_device,
    delete_device,
    resolve_device_key,
    revoke_device_key,
    rotate_device_key,
    sync_broker,
)
from sensormine.identity.secrets import hash_secret
from sensormine.services import launcher
from sensormine.services.mosquitto import PBKDF2_ITERATIONS, Mosquitto
from sensormine.settings import Settings, reset_settings
from sensormine.tenancy.tenants import create_tenant
from tests.factories import mqtt_publish, wait_until

pytestmark = pytest.mark.integration


GOOD = orjson.dumps({"ts": "2026-11-26T10:00:00Z", "values": {"temperature": 21.5}})
NOT_AUTHORIZED = 0x87  # MQTT 5 reason code, in the PUBACK of a publish the ACL refuses
MQTT_KEYS = {
    "SENSORMINE_MQTT_URL",
    "SENSORMINE_MQTT_ADMIN_USERNAME",
    "SENSORMINE_MQTT_ADMIN_PASSWORD",
    "SENSORMINE_MQTT_USERNAME",
    "SENSORMINE_MQTT_PASSWORD",
    "SENSORMINE_MQTT_TOOLS_USERNAME",
    "SENSORMINE_MQTT_TOOLS_PASSWORD",
}


def _env_settings(env: dict[str, str]) -> dict[str, str | None]:
    """Settings fields from the launcher's SENSORMINE_MQTT_* exports (None where not exported)."""
    fields = {k.removeprefix("SENSORMINE_").lower() for k in MQTT_KEYS}
    return {f: env.get(f"SENSORMINE_{f.upper()}") for f in fields}


@pytest.fixture(scope="module")
def broker_dir() -> Iterator[Path]:
    """A private launcher state dir (not pytest's tmp_path: the mosquitto user must reach it)."""
    d = Path(tempfile.mkdtemp(prefix="sensormine-identity-"))
    yield d
    launcher.down(state_dir=d, progress=print)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def broker_env(broker_dir: Path) -> dict[str, str]:
    """A Mosquitto with dynamic security, started by the launcher for this module."""
    return launcher.up(["mosquitto"], state_dir=broker_dir, progress=print)


@pytest.fixture
def ds(settings: Settings, broker_env: dict[str, str]) -> Settings:
    """The test's settings on the module's broker, on the in-process write path (no Kafka)."""
    return settings.model_copy(update={"kafka_bootstrap": None, **_env_settings(broker_env)})


@pytest.fixture
def broker(ds: Settings) -> Dynsec:
    """The dynamic-security admin client of the module's broker."""
    return Dynsec(ds)


@pytest.fixture
def tenant(conn: psycopg.Connection) -> str:
    """A fresh tenant (unique, since the broker outlives each test's database)."""
    tenant_id = f"t{uuid.uuid4().hex[:10]}"
    create_tenant(conn, tenant_id)
    return tenant_id


class Device:
    """A device's MQTT 5 session: PUBACK reason codes and the broker's DISCONNECT."""

    def __init__(self, settings: Settings, username: str, password: str) -> None:
        self.acks: dict[int, ReasonCode] = {}
        self.acked = threading.Condition()
        self.dropped = threading.Event()
        self.drop_reason: ReasonCode | None = None
        self.client = make_client("test-device", settings, username, password, mqtt5=True)
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.client.loop_start()

    def _on_publish(self, _c: object, _u: object, mid: int, reason_code: ReasonCode, _p: object) -> None:
        with self.acked:
            self.acks[mid] = reason_code
            self.acked.notify_all()

    def _on_disconnect(self, _c: object, _u: object, _f: object, reason_code: ReasonCode, _p: object) -> None:
        if not self.dropped.is_set():
            self.drop_reason = reason_code
            self.dropped.set()

    def publish(self, topic: str, payload: bytes = GOOD) -> ReasonCode:
        """Publish at QoS 1; the PUBACK's reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, 10), f"no PUBACK for {topic}"
            return self.acks[mid]

    def close(self) -> None:
        """Disconnect and stop the network thread (no reconnect attempts)."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices() -> Iterator[list[Device]]:
    """Collects device sessions and closes them after the test."""
    opened: list[Device] = []
    yield opened
    for d in opened:
        d.close()


def test_launcher_initialises_dynamic_security(broker_env: dict[str, str], broker_dir: Path, ds: Settings) -> None:
    assert set(broker_env) == MQTT_KEYS
    assert broker_env["SENSORMINE_MQTT_ADMIN_USERNAME"] == "sensormine-admin"
    assert broker_env["SENSORMINE_MQTT_USERNAME"] == "sensormine-ingest"
    assert broker_env["SENSORMINE_MQTT_TOOLS_USERNAME"] == "sensormine-tools"
    mosquitto = Mosquitto(broker_dir)
    for secret_file in (mosquitto.dynsec_file, mosquitto.credentials_file):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    # The service accounts' hashes are strong (was 101 PBKDF2 iterations); they still log in (below).
    accounts = json.loads(mosquitto.dynsec_file.read_text())["clients"]
    assert {c["username"]: c["iterations"] for c in accounts} == dict.fromkeys(
        ("sensormine-admin", "sensormine-ingest", "sensormine-tools"), PBKDF2_ITERATIONS
    )
    assert "allow_anonymous false" in (mosquitto.dir / "mosquitto.conf").read_text()
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("anonymous", ds.model_copy(update={"mqtt_tools_username": None}))
    # The ingest service client may subscribe to telemetry but publish nowhere.
    ingest = Device(ds, ds.mqtt_username or "", ds.mqtt_password or "")
    try:
        assert ingest.publish(telemetry_topic("acme", "press-1")).value == NOT_AUTHORIZED
    finally:
        ingest.close()


def test_a_device_publishes_to_its_own_topic_only(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str, devices: list[Device]
) -> None:
    other_tenant = f"{tenant}x"
    create_tenant(conn, other_tenant)
    _, key = create_device(conn, tenant, "press-1", broker=broker)
    create_device(conn, tenant, "press-2", broker=broker)
    create_device(conn, other_tenant, "press-1", broker=broker)
    daemon = MqttDaemon(ds).start()  # logs in as the ingest service client
    try:
        device = Device(ds, f"{tenant}/press-1", key)
        devices.append(device)
        assert not device.publish(telemetry_topic(tenant, "press-1")).is_failure
        for foreign in (
            telemetry_topic(tenant, "press-2"),  # a sibling device
            telemetry_topic(other_tenant, "press-1"),  # the same device id in another tenant
            f"sensormine/{tenant}/press-1/commands",  # its own subtree, not its telemetry topic
        ):
            assert device.publish(foreign).value == NOT_AUTHORIZED, foreign
        # The privileged tools client publishes after the refused messages; once its message is in,
        # the daemon has seen everything the broker let through.
        mqtt_publish(ds, [(telemetry_topic(tenant, "press-2"), GOOD)])
        assert wait_until(lambda: daemon.ingest.stats.received == 2)
        time.sleep(0.3)
        assert daemon.ingest.stats.received == 2
    finally:
        daemon.stop()
    rows = conn.execute("SELECT tenant_id, device_id, value FROM telemetry ORDER BY device_id").fetchall()
    assert rows == [(tenant, "press-1", 21.5), (tenant, "press-2", 21.5)]
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_wrong_or_unknown_credentials_are_refused_at_connect(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str
) -> None:
    _, key = create_device(conn, tenant, "press-1", broker=broker)
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("bad", ds, f"{tenant}/press-1", key + "x", mqtt5=True)
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("bad", ds, f"{tenant}/press-2", key)  # a key is only good for its own device
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("bad", ds, f"{tenant}/press-1", "")


def test_rotating_a_key_refuses_the_old_one_at_once(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str, devices: list[Device]
) -> None:
    _, old = create_device(conn, tenant, "press-1", broker=broker)
    device = Device(ds, f"{tenant}/press-1", old)
    devices.append(device)
    assert not device.publish(telemetry_topic(tenant, "press-1")).is_failure

    new = rotate_device_key(conn, tenant, "press-1", broker=broker)
    conn.commit()
    assert device.dropped.wait(5), "the session logged in with the old key was not dropped"
    assert device.drop_reason is not None and device.drop_reason.getName() == "Administrative action"
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("old-key", ds, f"{tenant}/press-1", old)
    renewed = Device(ds, f"{tenant}/press-1", new)
    devices.append(renewed)
    assert not renewed.publish(telemetry_topic(tenant, "press-1")).is_failure
    assert resolve_device_key(conn, old) is None
    assert resolve_device_key(conn, new) == (tenant, "press-1")


def test_rotation_changes_nothing_when_the_broker_is_unreachable(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str
) -> None:
    _, key = create_device(conn, tenant, "press-1", broker=broker)
    conn.commit()
    down = Dynsec(ds.model_copy(update={"mqtt_url": "mqtt://127.0.0.1:1"}))
    with pytest.raises(DynsecError, match="cannot reach the MQTT broker"):
        rotate_device_key(conn, tenant, "press-1", broker=down)
    conn.commit()
    assert resolve_device_key(conn, key) == (tenant, "press-1")
    make_client("still-good", ds, f"{tenant}/press-1", key).disconnect()


def test_revoking_a_key_disconnects_and_refuses_the_device(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str, devices: list[Device]
) -> None:
    _, key = create_device(conn, tenant, "press-1", broker=broker)
    device = Device(ds, f"{tenant}/press-1", key)
    devices.append(device)

    assert revoke_device_key(conn, tenant, "press-1", broker=broker) is BrokerUpdate.APPLIED
    conn.commit()
    assert device.dropped.wait(5), "the revoked device's session was not dropped"
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("revoked", ds, f"{tenant}/press-1", key)
    assert resolve_device_key(conn, key) is None  # HTTP ingest refuses it too
    assert broker.list_clients()[f"{tenant}/press-1"].disabled

    fresh = rotate_device_key(conn, tenant, "press-1", broker=broker)  # a new key brings it back
    make_client("back", ds, f"{tenant}/press-1", fresh).disconnect()


def test_deleting_a_device_removes_its_broker_identity(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str
) -> None:
    _, key = create_device(conn, tenant, "press-1", broker=broker)
    assert delete_device(conn, tenant, "press-1", broker=broker) is BrokerUpdate.APPLIED
    conn.commit()
    assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
    assert f"{tenant}/press-1" not in broker.list_clients()
    assert device_rolename(tenant, "press-1") not in broker.list_roles()
    with pytest.raises(MqttConnectError, match="Not authorized"):
        make_client("deleted", ds, f"{tenant}/press-1", key)


def test_sync_broker_catches_up_after_an_outage(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    down = Dynsec(ds.model_copy(update={"mqtt_url": "mqtt://127.0.0.1:1"}))
    _, ok_key = create_device(conn, tenant, "ok-1", broker=broker)
    _, tampered_key = create_device(conn, tenant, "tampered-1", broker=broker)
    create_device(conn, tenant, "revoked-1", broker=broker)
    with caplog.at_level(logging.WARNING, logger="sensormine.devices.registry"):
        _, lost_key = create_device(conn, tenant, "lost-1", broker=down)  # the registry does not wait for the broker
        assert revoke_device_key(conn, tenant, "revoked-1", broker=down) is BrokerUpdate.FAILED
    assert "rotate-key" in caplog.text and "sync-broker" in caplog.text
    conn.commit()
    with pytest.raises(MqttConnectError):
        make_client("lost", ds, f"{tenant}/lost-1", lost_key)
    # Someone took the tampered device's role away and disabled it at the broker.
    user = device_username(tenant, "tampered-1")
    broker.execute(
        [{"command": "modifyClient", "username": user, "roles": []}, {"command": "disableClient", "username": user}]
    )
    broker.provision_device(tenant, "gone-1", "smd_orphan")  # a client whose device is not registered

    report = sync_broker(conn, broker=broker)
    assert report.checked == 4
    assert report.repaired == [user]
    assert report.disabled == [device_username(tenant, "revoked-1")]
    assert report.missing == [device_username(tenant, "lost-1")]
    assert report.rotated == {} and report.pruned == []
    tampered = Device(ds, user, tampered_key)  # password untouched by the repair, role back
    try:
        assert not tampered.publish(telemetry_topic(tenant, "tampered-1")).is_failure
    finally:
        tampered.close()
    make_client("ok", ds, f"{tenant}/ok-1", ok_key).disconnect()

    report = sync_broker(conn, broker=broker, rotate_missing=True, prune=True)
    conn.commit()
    lost = device_username(tenant, "lost-1")
    assert list(report.rotated) == [lost] and report.missing == []
    assert device_username(tenant, "gone-1") in report.pruned
    assert report.repaired == report.disabled == []
    make_client("found", ds, lost, report.rotated[lost]).disconnect()
    assert resolve_device_key(conn, report.rotated[lost]) == (tenant, "lost-1")
    clients = broker.list_clients()
    assert device_username(tenant, "gone-1") not in clients
    assert all(c.textname == DEVICE_TEXTNAME for u, c in clients.items() if u.startswith(f"{tenant}/"))


def test_identities_survive_a_broker_restart(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str, broker_dir: Path
) -> None:
    _, key = create_device(conn, tenant, "press-1", broker=broker)
    launcher.down(["mosquitto"], state_dir=broker_dir, progress=print)
    env = launcher.up(["mosquitto"], state_dir=broker_dir, progress=print)
    assert env["SENSORMINE_MQTT_URL"] == ds.mqtt_url  # same port, same users
    assert env["SENSORMINE_MQTT_ADMIN_PASSWORD"] == ds.mqtt_admin_password
    device = Device(ds, f"{tenant}/press-1", key)
    try:
        assert not device.publish(telemetry_topic(tenant, "press-1")).is_failure
        assert device.publish(telemetry_topic(tenant, "press-2")).value == NOT_AUTHORIZED
    finally:
        device.close()


@contextmanager
def env_pointing_at(ds: Settings) -> Iterator[None]:
    """SENSORMINE_* variables for code that reads the global settings: the test's database, the module's broker."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SENSORMINE_DATABASE_URL", ds.database_url or "")
        mp.setenv("SENSORMINE_DATABASE_MIGRATE_URL", ds.database_migrate_url or "")
        for field in _env_settings({}):
            value = getattr(ds, field)
            if value is None:
                mp.delenv(f"SENSORMINE_{field.upper()}", raising=False)
            else:
                mp.setenv(f"SENSORMINE_{field.upper()}", value)
        reset_settings()
        yield
    reset_settings()  # after the environment is restored, so no later test sees these settings


def test_simulated_devices_log_in_with_their_keys(
    ds: Settings, broker: Dynsec, conn: psycopg.Connection, tenant: str
) -> None:
    keys = {f"{tenant}/{d}": create_device(conn, tenant, d, broker=broker)[1] for d in ("motor-1", "tank-1")}
    conn.commit()
    daemon = MqttDaemon(ds).start()
    stop = threading.Event()
    with env_pointing_at(ds):  # the simulator connects with the global settings
        sim = threading.Thread(
            target=run_simulator, args=([(tenant, "motor-1"), (tenant, "tank-1")], 0.05, stop, 0.0, keys)
        )
        sim.start()
        try:
            assert wait_until(lambda: daemon.ingest.stats.accepted >= 6), daemon.ingest.stats
        finally:
            stop.set()
            sim.join(10)
            daemon.stop()
        with pytest.raises(MqttConnectError, match="Not authorized"):
            run_simulator([(tenant, "motor-1")], 0.05, threading.Event(), 0.0, {f"{tenant}/motor-1": "smd_wrong"})
    assert daemon.ingest.stats.rejected == 0
    seen = {r[0] for r in conn.execute("SELECT DISTINCT device_id FROM telemetry").fetchall()}
    assert seen == {"motor-1", "tank-1"}


@pytest.fixture
def cli(ds: Settings) -> Iterator[Callable[..., Result]]:
    """`sensormine ...` with the environment pointing at the test's database and the module's broker."""
    runner = CliRunner()
    with env_pointing_at(ds):
        yield lambda *args, **kw: runner.invoke(app, list(args), **kw)


def test_cli_rotate_revoke_delete_and_sync(
    cli: Callable[..., Result], ds: Settings, conn: psycopg.Connection, tenant: str
) -> None:
    made = cli("device", "create", tenant, "press-1")
    assert made.exit_code == 0, made.output
    assert f"MQTT user: {tenant}/press-1" in made.output
    key = made.output.split("device key (shown once): ")[1].split()[0]
    make_client("cli-made", ds, f"{tenant}/press-1", key).disconnect()

    rotated = cli("device", "rotate-key", tenant, "press-1")
    assert rotated.exit_code == 0, rotated.output
    new = rotated.output.split("device key (shown once): ")[1].split()[0]
    assert conn.execute("SELECT key_hash FROM devices").fetchone() == (hash_secret(new),)
    with pytest.raises(MqttConnectError):
        make_client("cli-old", ds, f"{tenant}/press-1", key)
    make_client("cli-new", ds, f"{tenant}/press-1", new).disconnect()

    revoked = cli("device", "revoke", tenant, "press-1")
    assert revoked.exit_code == 0 and "client disabled" in revoked.output, revoked.output
    with pytest.raises(MqttConnectError):
        make_client("cli-revoked", ds, f"{tenant}/press-1", new)

    synced = cli("device", "sync-broker")
    assert synced.exit_code == 0 and "1 registered device(s) compared" in synced.output, synced.output

    refused = cli("device", "delete", tenant, "press-1", input="n\n")
    assert refused.exit_code != 0
    deleted = cli("device", "delete", tenant, "press-1", "--yes")
    assert deleted.exit_code == 0 and "client and role deleted" in deleted.output, deleted.output
    missing = cli("device", "rotate-key", tenant, "press-1")
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_embedded_broker_stays_anonymous(settings: Settings) -> None:
    """amqtt has no dynamic-security plugin: no users are exported and provisioning is a logged no-op."""
    d = Path(tempfile.mkdtemp(prefix="sensormine-identity-embedded-"))
    try:
        env = launcher.up(["mosquitto"], state_dir=d, progress=print, embedded=True)
        assert set(env) == {"SENSORMINE_MQTT_URL"}
        embedded = settings.model_copy(update=_env_settings(env))
        broker = Dynsec(embedded)
        assert not broker.enabled
        assert broker.provision_device("acme", "press-1", "smd_x") is False
        assert broker.revoke_device("acme", "press-1") is False
        # Devices that send their credentials anyway are let in (amqtt allows anonymous clients).
        make_client("embedded", embedded, "acme/press-1", "smd_x").disconnect()
    finally:
        launcher.down(state_dir=d, progress=print)
        shutil.rmtree(d, ignore_errors=True)
