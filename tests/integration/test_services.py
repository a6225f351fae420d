"""The service launcher starts real servers that answer real clients, reuses them, and stops them."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from sensormine.services import launcher
from sensormine.services.process import pid_alive
from sensormine.services.system import private_state_home

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

POSTGRES_KEYS = {
    "SENSORMINE_DATABASE_URL",  # the tools' login: no superuser, no privilege of its own
    "SENSORMINE_DATABASE_MIGRATE_URL",  # the schema owner
    "SENSORMINE_DATABASE_ADMIN_URL",  # the superuser, for bootstrap and tests' own checks
    "PGPASSFILE",  # the generated passwords (scram-sha-256; no trust)
}
EXPECTED_KEYS = POSTGRES_KEYS | {
    "SENSORMINE_MQTT_URL",
    "SENSORMINE_REDIS_URL",
    "SENSORMINE_KAFKA_BOOTSTRAP",
    "SENSORMINE_S3_ENDPOINT",
    "SENSORMINE_S3_ACCESS_KEY",
    "SENSORMINE_S3_SECRET_KEY",
    "SENSORMINE_S3_REGION",
    "SENSORMINE_SMTP_URL",
    "SENSORMINE_SMTP_MAILDIR",
    "SENSORMINE_STRIPE_API_BASE",
    "SENSORMINE_STRIPE_API_KEY",
    "SENSORMINE_STRIPE_WEBHOOK_SECRET",
    # Mosquitto runs with its dynamic-security plugin: the launcher's users (docs/device-identity.md).
    "SENSORMINE_MQTT_ADMIN_USERNAME",
    "SENSORMINE_MQTT_ADMIN_PASSWORD",
    "SENSORMINE_MQTT_USERNAME",
    "SENSORMINE_MQTT_PASSWORD",
    "SENSORMINE_MQTT_TOOLS_USERNAME",
    "SENSORMINE_MQTT_TOOLS_PASSWORD",
}


def _fresh_state_dir(tag: str) -> Path:
    # Not pytest's tmp_path: it lives under /tmp/pytest-of-root (mode 0700), which the
    # postgres/mosquitto users cannot enter when the launcher runs as root.
    return Path(tempfile.mkdtemp(prefix=f"sensormine-{tag}-"))


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    """A private state dir, so the test never touches anyone else's services."""
    d = _fresh_state_dir("services-test")
    yield d
    launcher.down(state_dir=d, progress=print)  # safety net if a test failed midway
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def env(state_dir: Path) -> dict[str, str]:
    """Everything up once for the module."""
    t0 = time.monotonic()
    settings = launcher.up(state_dir=state_dir, progress=print)
    print(f"cold up took {time.monotonic() - t0:.1f} s")
    return settings


def _pids(state_dir: Path) -> dict[str, int]:
    return {name: s["pid"] for name, s in launcher.status(state_dir).items()}


def test_env_has_exact_settings(env: dict[str, str], state_dir: Path) -> None:
    assert set(env) == EXPECTED_KEYS
    assert env["SENSORMINE_DATABASE_URL"].startswith("postgresql://sensormine_app@127.0.0.1:")
    assert env["SENSORMINE_DATABASE_URL"].endswith("/sensormine")
    assert env["SENSORMINE_MQTT_URL"].startswith("mqtt://127.0.0.1:")
    assert env["SENSORMINE_REDIS_URL"].startswith("redis://127.0.0.1:")
    assert env["SENSORMINE_REDIS_URL"].endswith("/0")
    assert env["SENSORMINE_KAFKA_BOOTSTRAP"].startswith("127.0.0.1:")
    assert env["SENSORMINE_S3_ENDPOINT"].startswith("http://127.0.0.1:")
    assert (env["SENSORMINE_S3_ACCESS_KEY"], env["SENSORMINE_S3_SECRET_KEY"]) == ("test", "test")
    assert env["SENSORMINE_S3_REGION"] == "us-east-1"
    assert env["SENSORMINE_SMTP_URL"].startswith("smtp://127.0.0.1:")
    assert env["SENSORMINE_SMTP_MAILDIR"] == str(state_dir / "services" / "smtp" / "maildir")
    assert env["SENSORMINE_STRIPE_API_BASE"].startswith("http://127.0.0.1:")
    exported = (state_dir / "services.env").read_text()
    for key, value in env.items():
        assert f"export {key}={value}\n" in exported
    assert (state_dir / "services" / "services.json").exists()


def test_postgres_answers(env: dict[str, str]) -> None:
    import psycopg

    with psycopg.connect(env["SENSORMINE_DATABASE_URL"], passfile=env["PGPASSFILE"], connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        assert conn.execute("select current_database()").fetchone() == ("sensormine",)
        assert conn.execute("show synchronous_commit").fetchone() == ("off",)
        assert conn.execute("show max_connections").fetchone() == ("200",)


def test_postgres_wants_passwords_and_no_login_is_a_superuser(env: dict[str, str]) -> None:
    """scram-sha-256 on every connection (no trust), and the run-time logins hold no power over the rules."""
    import psycopg

    for key in ("SENSORMINE_DATABASE_URL", "SENSORMINE_DATABASE_ADMIN_URL"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(env[key], passfile="/dev/null", password="", connect_timeout=10).close()
    with psycopg.connect(env["SENSORMINE_DATABASE_ADMIN_URL"], passfile=env["PGPASSFILE"]) as admin:
        logins = admin.execute(
            "SELECT rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolinherit FROM pg_roles "
            "WHERE rolname LIKE 'sensormine%%' AND rolcanlogin ORDER BY rolname"
        ).fetchall()
    assert [r[0] for r in logins] == [
        "sensormine_api",
        "sensormine_app",
        "sensormine_dagster",
        "sensormine_ingestd",
        "sensormine_owner",
        "sensormine_streamd",
    ]
    assert all(r[1:] == (False, False, False, False, False) for r in logins), logins


def _mqtt_round_trip(url: str, env: dict[str, str] | None = None) -> bytes:
    """Subscribe, publish, receive; as the launcher's tools user when the broker has users."""
    import paho.mqtt.client as mqtt

    u = urlparse(url)
    topic = f"sensormine/test/{uuid.uuid4().hex}"
    subscribed, received = threading.Event(), threading.Event()
    got: list[bytes] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        received.set()

    client.on_message = on_message
    if env and env.get("SENSORMINE_MQTT_TOOLS_USERNAME"):
        client.username_pw_set(env["SENSORMINE_MQTT_TOOLS_USERNAME"], env["SENSORMINE_MQTT_TOOLS_PASSWORD"])
    client.connect(u.hostname or "127.0.0.1", u.port or 1883)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"
        client.publish(topic, b"hello-sensormine", qos=1).wait_for_publish(10)
        assert received.wait(10), "message did not come back"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def test_mqtt_round_trip(env: dict[str, str]) -> None:
    assert _mqtt_round_trip(env["SENSORMINE_MQTT_URL"], env) == b"hello-sensormine"


def test_redis_answers(env: dict[str, str]) -> None:
    import redis

    r = redis.Redis.from_url(env["SENSORMINE_REDIS_URL"])
    assert r.ping() is True
    r.set("sensormine:test", "1")
    assert r.get("sensormine:test") == b"1"
    r.close()


def test_kafka_produce_consume(env: dict[str, str]) -> None:
    from confluent_kafka import Consumer, Producer

    bootstrap = env["SENSORMINE_KAFKA_BOOTSTRAP"]
    topic = f"sensormine-test-{uuid.uuid4().hex[:8]}"  # auto-created by the broker
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"reading-1")
    assert producer.flush(30) == 0, "message not delivered"
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"}
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        value = None
        while value is None and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None and msg.error() is None:
                value = msg.value()
        assert value == b"reading-1"
    finally:
        consumer.close()


def test_s3_put_get(env: dict[str, str]) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=env["SENSORMINE_S3_ENDPOINT"],
        aws_access_key_id=env["SENSORMINE_S3_ACCESS_KEY"],
        aws_secret_access_key=env["SENSORMINE_S3_SECRET_KEY"],
        region_name=env["SENSORMINE_S3_REGION"],
    )
    s3.create_bucket(Bucket="sensormine-test")
    s3.put_object(Bucket="sensormine-test", Key="a/b.txt", Body=b"lake")
    assert s3.get_object(Bucket="sensormine-test", Key="a/b.txt")["Body"].read() == b"lake"


def test_smtp_stores_mail_in_its_maildir(env: dict[str, str]) -> None:
    import mailbox
    import smtplib
    from email.message import EmailMessage

    url = urlparse(env["SENSORMINE_SMTP_URL"])
    subject = f"launcher test {uuid.uuid4().hex}"
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"] = subject, "launcher@sensormine.local", "ops@example.com"
    msg.set_content("hello-sensormine")
    with smtplib.SMTP(url.hostname or "127.0.0.1", url.port or 25, timeout=10) as smtp:
        smtp.send_message(msg, to_addrs=["ops@example.com", "hidden@example.com"])  # the second one as Bcc
    stored = [m for m in mailbox.Maildir(env["SENSORMINE_SMTP_MAILDIR"], create=False) if m["Subject"] == subject]
    assert len(stored) == 1  # the server answers 250 only once the message is in new/
    assert stored[0]["X-RcptTo"] == "ops@example.com, hidden@example.com"
    assert stored[0]["X-MailFrom"] == "launcher@sensormine.local"
    assert stored[0].get_payload(decode=True) == b"hello-sensormine\n"


def test_second_up_reuses_running_services(env: dict[str, str], state_dir: Path) -> None:
    before = _pids(state_dir)
    messages: list[str] = []
    t0 = time.monotonic()
    again = launcher.up(state_dir=state_dir, progress=messages.append)
    print(f"warm up took {time.monotonic() - t0:.2f} s")
    assert again == env
    assert _pids(state_dir) == before
    assert sum("already running" in m for m in messages) == len(launcher.ALL_SERVICES)


def test_status_reports_running(env: dict[str, str], state_dir: Path) -> None:
    info = launcher.status(state_dir)
    assert set(info) == set(launcher.ALL_SERVICES)
    for name, s in info.items():
        assert s["state"] == "running", name
        assert s["running"] is True
        assert isinstance(s["pid"], int) and pid_alive(s["pid"])
        assert s["url"]
    assert info["postgres"]["url"] == env["SENSORMINE_DATABASE_URL"]


def test_cli_env_and_status(env: dict[str, str], state_dir: Path) -> None:
    from typer.testing import CliRunner

    from cli.services import app

    runner = CliRunner()
    out = runner.invoke(app, ["env", "--state-dir", str(state_dir)])
    assert out.exit_code == 0, out.output
    assert f"export SENSORMINE_KAFKA_BOOTSTRAP={env['SENSORMINE_KAFKA_BOOTSTRAP']}" in out.output
    out = runner.invoke(app, ["status", "--state-dir", str(state_dir)])
    assert out.exit_code == 0, out.output
    assert out.output.count("running") == len(launcher.ALL_SERVICES)


def test_up_restarts_a_dead_service_only(env: dict[str, str], state_dir: Path) -> None:
    before = _pids(state_dir)
    os.kill(before["redis"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(before["redis"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.status(state_dir)["redis"]["state"] == "stopped"
    again = launcher.up(["redis"], state_dir=state_dir, progress=print)
    after = _pids(state_dir)
    assert after["redis"] != before["redis"]
    assert {k: v for k, v in after.items() if k != "redis"} == {k: v for k, v in before.items() if k != "redis"}
    assert again["SENSORMINE_REDIS_URL"] == env["SENSORMINE_REDIS_URL"]  # same port reused when free


def test_down_stops_everything(env: dict[str, str], state_dir: Path) -> None:
    pids = _pids(state_dir)
    launcher.down(state_dir=state_dir, progress=print)
    for name, pid in pids.items():
        assert not pid_alive(pid), f"{name} (pid {pid}) still running"
    assert all(s["state"] == "stopped" for s in launcher.status(state_dir).values())
    assert "export" not in (state_dir / "services.env").read_text()
    assert launcher.env(state_dir) == {}


def test_up_after_down_keeps_urls(env: dict[str, str], state_dir: Path) -> None:
    again = launcher.up(["postgres", "redis"], state_dir=state_dir, progress=print)
    try:
        assert again["SENSORMINE_DATABASE_URL"] == env["SENSORMINE_DATABASE_URL"]  # data dir and port reused
        assert again["SENSORMINE_REDIS_URL"] == env["SENSORMINE_REDIS_URL"]
        assert set(launcher.status(state_dir)["kafka"].values()) >= {"stopped"}
    finally:
        launcher.down(state_dir=state_dir, progress=print)
    assert launcher.env(state_dir) == {}


def test_embedded_postgres_and_mqtt() -> None:
    """The --embedded path: pgserver's PostgreSQL and the amqtt broker, no Debian packages."""
    import psycopg

    d = _fresh_state_dir("services-embedded")
    try:
        env = launcher.up(["postgres", "mosquitto"], state_dir=d, progress=print, embedded=True)
        assert set(env) == POSTGRES_KEYS | {"SENSORMINE_MQTT_URL"}
        info = launcher.status(d)
        assert info["postgres"]["mode"] == info["mosquitto"]["mode"] == "embedded"
        with psycopg.connect(env["SENSORMINE_DATABASE_URL"], passfile=env["PGPASSFILE"], connect_timeout=10) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert _mqtt_round_trip(env["SENSORMINE_MQTT_URL"]) == b"hello-sensormine"
        pids = _pids(d)
    finally:
        launcher.down(state_dir=d, progress=print)
        shutil.rmtree(private_state_home(d), ignore_errors=True)  # a copy of pgserver, when its venv is private
        shutil.rmtree(d, ignore_errors=True)
    assert not any(pid_alive(p) for p in pids.values() if p)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands servers to unprivileged users")
def test_state_dir_inside_a_private_folder() -> None:
    """A clone under a 0700 folder (as CI's may be): servers that drop root keep their files in /var/tmp."""
    import psycopg

    private = _fresh_state_dir("services-private")  # mkdtemp: mode 0700
    d = private / "clone" / ".sensormine"
    try:
        env = launcher.up(["postgres", "mosquitto"], state_dir=d, progress=print)
        with psycopg.connect(env["SENSORMINE_DATABASE_URL"], passfile=env["PGPASSFILE"], connect_timeout=10) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert _mqtt_round_trip(env["SENSORMINE_MQTT_URL"], env) == b"hello-sensormine"
        logs = {name: info["log"] for name, info in launcher.status(d).items() if info["running"]}
        assert all(str(path).startswith("/var/tmp/sensormine-") for path in logs.values()), logs
        pids = _pids(d)
    finally:
        launcher.down(state_dir=d, progress=print)
        shutil.rmtree(private_state_home(d), ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    assert not any(pid_alive(p) for p in pids.values() if p)
