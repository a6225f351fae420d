"""`sensormine demo`: the platform on its embedded defaults, with simulated devices for two tenants.

Starts PostgreSQL and an MQTT broker (through the service launcher), seeds two tenants with
devices, then runs the MQTT ingest daemon (in-process write path: no Kafka), a device
simulator, the API and the Dagster UI as child processes, and prints where to look.
"""

from __future__ import annotations

import contextlib
import json
import mailbox
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from orchestration.webserver import DagsterGraphQLError, DagsterWebserver, dagster_dev_command, prepare_dagster_home
from sensormine.alerts import usecases as alert_usecases
from sensormine.alerts.store import DuplicateRule
from sensormine.billing.usecases import sign_up_tenant
from sensormine.clients.dynsec import Dynsec
from sensormine.clients.postgres import INGEST, connect, ensure_partition_window, migrate_database
from sensormine.devices import usecases
from sensormine.devices.profiles import set_profile
from sensormine.devices.registry import DuplicateDevice
from sensormine.identity.credentials import operator_identity
from sensormine.identity.usecases import issue_api_key
from sensormine.services.errors import ServiceError
from sensormine.services.launcher import up
from sensormine.services.postgres import role_url
from sensormine.settings import Settings
from sensormine.tenancy.tenants import get_tenant

DEMO_TENANTS = {
    "acme": ["motor-1", "tank-1", "motor-2"],
    "globex": ["motor-1", "tank-1"],
}
# Devices the daemons reach themselves: (tenant, device) -> (protocol, simulated device of the simulator).
FIELD_DEVICES = {
    ("acme", "press-motor"): ("opcua", "motor-1"),
    ("acme", "press-tank"): ("opcua", "tank-1"),
    ("acme", "line-plc"): ("modbus", ""),
}
# Alarm rules the simulated motors trip now and then: a bearing knock (vibration x4, about once in
# 8 minutes per motor), caught by a threshold and by the bundled anomaly model, and the winding
# temperature in the high-load part of its 30-minute cycle.
DEMO_RULES: dict[str, dict[str, Any]] = {
    "bearing-knock": {
        "name": "Bearing knock",
        "severity": "major",
        "scope": {"device_type": "motor"},
        "condition": {"kind": "threshold", "metric": "vibration", "op": "gt", "value": 8, "hysteresis": 2},
    },
    "vibration-anomaly": {
        "name": "Vibration anomaly (model)",
        "severity": "minor",
        "scope": {"device_type": "motor"},
        "condition": {"kind": "anomaly", "metric": "vibration", "above": 0.6},
    },
    "motor-hot": {
        "name": "Motor running hot",
        "severity": "critical",
        "scope": {"device_type": "motor"},
        "condition": {"kind": "threshold", "metric": "temperature", "op": "gt", "value": 62, "hysteresis": 1},
        "for_s": 60,
    },
}
REPO = Path(__file__).resolve().parent.parent
Say = Callable[[str], None]


# Each process logs in to PostgreSQL as its own role (docs/decisions.md, "No superuser at run time").
PROCESS_LOGINS = {
    "api": "sensormine_api",
    "mqtt-daemon": "sensormine_ingestd",
    "opcua-daemon": "sensormine_ingestd",
    "modbus-daemon": "sensormine_ingestd",
    "dagster": "sensormine_dagster",
}


def _as_login(env: dict[str, str], login: str | None) -> dict[str, str]:
    """`env` with SENSORMINE_DATABASE_URL logging in as `login` (the same passwords file serves them all)."""
    url = env.get("SENSORMINE_DATABASE_URL")
    return {**env, "SENSORMINE_DATABASE_URL": role_url(url, login)} if login and url else env


def seed(
    conn: psycopg.Connection, settings: Settings, broker: Dynsec | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Create the demo tenants and devices when missing, through the same use cases as the CLI and the API.

    Returns a fresh API key per tenant, and a device key per simulated device ({"tenant/device": key}):
    new devices get theirs at creation, devices seeded by an earlier run get a new one (keys are
    stored hashed), and the broker learns each at once. Everything is audited as the operator (`cli`).
    """
    keys, device_keys = {}, {}
    for tenant_id, devices in DEMO_TENANTS.items():
        operator = operator_identity(conn)
        with operator.scope(conn):
            missing = get_tenant(conn, tenant_id) is None
        if missing:
            sign_up_tenant(conn, operator, settings, tenant_id, tenant_id.capitalize(), plan="pro")
            operator = operator_identity(conn)  # now seeing the new tenant too
        for device_id in devices:
            kind = "motor" if "motor" in device_id else "tank"
            try:
                key = usecases.register_device(
                    conn, operator, tenant_id, device_id, device_type=kind, broker=broker
                ).key
            except DuplicateDevice:  # seeded by an earlier run
                key = usecases.rotate_key(conn, operator, tenant_id, device_id, broker or Dynsec(settings))
            device_keys[f"{tenant_id}/{device_id}"] = key
        keys[tenant_id] = issue_api_key(conn, operator, tenant_id, "demo").secret
    operator = operator_identity(conn)
    for (tenant_id, device_id), (protocol, _) in FIELD_DEVICES.items():
        with contextlib.suppress(DuplicateDevice):  # seeded by an earlier run
            usecases.register_device(
                conn, operator, tenant_id, device_id, device_type=f"{protocol}-demo", broker=broker
            )
    for tenant_id in DEMO_TENANTS:
        for rule_id, rule in DEMO_RULES.items():
            with contextlib.suppress(DuplicateRule):  # seeded by an earlier run
                alert_usecases.create_rule(
                    conn,
                    operator,
                    tenant_id,
                    rule_id,
                    {**rule, "notify": {"emails": [f"operators@{tenant_id}.example"]}},
                )
    return keys, device_keys


def _start_field_simulators(py: str, logs: Path, say: Say) -> tuple[dict[str, subprocess.Popen], dict[str, dict]]:
    """Start the OPC UA and Modbus simulators on free ports; returns them and their profiles by device."""
    sims = {
        "opcua-simulator": [py, "-m", "ingest_daemons.simulators.opcua_server", "--port", "0", "--print-profiles"],
        "modbus-simulator": [py, "-m", "ingest_daemons.simulators.modbus_server", "--port", "0", "--print-profile"],
    }
    children: dict[str, subprocess.Popen] = {}
    profiles: dict[str, dict] = {}
    try:
        _read_profiles(sims, children, profiles, logs, say)
    except BaseException:
        for proc in children.values():
            proc.kill()
        raise
    return children, profiles


def _read_profiles(
    sims: dict[str, list[str]], children: dict[str, subprocess.Popen], profiles: dict[str, dict], logs: Path, say: Say
) -> None:
    for name, cmd in sims.items():
        say(f"starting {name} (log: {logs / (name + '.log')})")
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=(logs / f"{name}.log").open("wb"),
            start_new_session=True,
            text=True,
        )
        children[name] = proc
        assert proc.stdout is not None
        wanted = 2 if name.startswith("opcua") else 1
        while len([k for k in profiles if k.startswith(name)]) < wanted:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited early; see {logs / (name + '.log')}")
            if line.startswith("{"):
                doc = json.loads(line)
                device = doc.get("device", "")
                profiles[f"{name}:{device}"] = doc.get("profile", doc)


def _start_services(state_dir: Path, say: Say) -> dict[str, str]:
    try:
        return up(["postgres", "mosquitto", "smtp"], state_dir=state_dir, progress=say)
    except ServiceError as exc:
        say(f"system services unavailable ({str(exc).splitlines()[0]}); using the embedded ones")
        return up(["postgres", "mosquitto", "smtp"], state_dir=state_dir, progress=say, embedded=True)


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def run_demo(api_port: int = 8000, dagster_port: int = 3000, check: bool = False, with_dagster: bool = True) -> int:
    """Run until Ctrl-C (or, with `check`, until simulated points are served by the API and a knock raised an alarm)."""
    state_dir = Path(os.environ.get("SENSORMINE_STATE_DIR", Path.cwd() / ".sensormine")).absolute()
    say = lambda msg: print(f"[demo] {msg}", flush=True)  # noqa: E731
    services = _start_services(state_dir, say)
    env = {**os.environ, **services, "SENSORMINE_STATE_DIR": str(state_dir)}
    env.pop("SENSORMINE_KAFKA_BOOTSTRAP", None)  # the embedded default: daemons write in-process
    settings = Settings(
        database_url=services["SENSORMINE_DATABASE_URL"],
        database_migrate_url=services.get("SENSORMINE_DATABASE_MIGRATE_URL"),
        mqtt_url=services["SENSORMINE_MQTT_URL"],
        # Set when the broker runs with dynamic security (not the embedded amqtt): devices are provisioned there.
        mqtt_admin_username=services.get("SENSORMINE_MQTT_ADMIN_USERNAME"),
        mqtt_admin_password=services.get("SENSORMINE_MQTT_ADMIN_PASSWORD"),
        state_dir=state_dir,
    )
    migrate_database(settings)
    with connect(settings, role=INGEST) as conn:
        ensure_partition_window(conn, datetime.now(UTC).date(), settings)
    with connect(settings) as conn:
        keys, device_keys = seed(conn, settings, Dynsec(settings))

    logs = state_dir / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    keys_file = logs / "device-keys.json"  # the simulated devices log in with their own keys
    keys_file.touch(mode=0o600)
    keys_file.chmod(0o600)
    keys_file.write_text(json.dumps(device_keys, indent=2) + "\n")
    if with_dagster:
        env["DAGSTER_HOME"] = str(prepare_dagster_home(state_dir / "dagster"))
    py = sys.executable
    field_children, field_profiles = _start_field_simulators(py, logs, say)
    with connect(settings) as conn, operator_identity(conn).scope(conn, write=True):
        for (tenant_id, device_id), (protocol, simulated) in FIELD_DEVICES.items():
            set_profile(conn, tenant_id, device_id, field_profiles[f"{protocol}-simulator:{simulated}"])
    devices = [f"{t}/{d}" for t, ds in DEMO_TENANTS.items() for d in ds]
    commands = {
        "mqtt-daemon": [py, "-m", "ingest_daemons.mqtt"],
        "opcua-daemon": [py, "-m", "ingest_daemons.opcua"],
        "modbus-daemon": [py, "-m", "ingest_daemons.modbus"],
        "simulator": [
            py,
            "-m",
            "ingest_daemons.simulators.mqtt_publisher",
            "--interval",
            "1",
            "--keys-file",
            str(keys_file),
            *devices,
        ],
        "api": [py, "-m", "uvicorn", "serving.main:app", "--factory", "--host", "127.0.0.1", "--port", str(api_port)],
    }
    if with_dagster:
        commands["dagster"] = dagster_dev_command(dagster_port)
    children: dict[str, subprocess.Popen] = dict(field_children)
    for name, cmd in commands.items():
        say(f"starting {name} (log: {logs / (name + '.log')})")
        children[name] = subprocess.Popen(
            cmd,
            env=_as_login(env, PROCESS_LOGINS.get(name)),
            cwd=REPO,
            stdout=(logs / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        api = f"http://127.0.0.1:{api_port}"
        if not _wait_http(f"{api}/readyz", 60):
            say(f"the API did not become ready; its log says:\n{_tail(logs / 'api.log')}")
            return 1
        now = datetime.now(UTC)
        start = (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        end = (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        example = f"{api}/api/query/telemetry?device_id=motor-1&metric=temperature&start={start}&end={end}"
        if check:
            if with_dagster and not _wait_http(f"http://127.0.0.1:{dagster_port}/server_info", 180):
                say(f"the Dagster UI did not answer; its log says:\n{_tail(logs / 'dagster.log')}")
                return 1
            if with_dagster and not _check_tenant_partitions(f"http://127.0.0.1:{dagster_port}", say):
                say(f"the demo tenants did not become partitions; the Dagster log says:\n{_tail(logs / 'dagster.log')}")
                return 1
            field = {
                "press-motor (OPC UA)": f"{api}/api/query/telemetry?device_id=press-motor&metric=temperature"
                f"&start={start}&end={end}",
                "line-plc (Modbus)": f"{api}/api/query/telemetry?device_id=line-plc&metric=motor.temperature"
                f"&start={start}&end={end}",
            }
            if _check({"motor-1 (MQTT)": example, **field}, keys["acme"], say):
                return 1
            return _check_alarm(
                api, keys["acme"], device_keys["acme/motor-1"], services.get("SENSORMINE_SMTP_MAILDIR"), say
            )
        dagster_line = (
            f"  Dagster UI     http://127.0.0.1:{dagster_port}  (the tenants are partitions within a minute;\n"
            "                 lake/telemetry is compacted hourly, or materialize today's partitions)\n"
            if with_dagster
            else ""
        )
        print(
            "\nSensormine demo is running.\n"
            f"  API docs       {api}/docs\n"
            f"{dagster_line}"
            f"  MQTT broker    {services['SENSORMINE_MQTT_URL']}  (topic sensormine/{{tenant}}/{{device}}/telemetry)\n"
            f"  Device keys    {keys_file}  (MQTT user tenant/device, password its key)\n"
            f"  PostgreSQL     {services['SENSORMINE_DATABASE_URL']}\n"
            "  Field devices  acme/press-motor, acme/press-tank (OPC UA simulator), acme/line-plc (Modbus simulator);\n"
            "                 their profiles: GET /api/devices/{device}/profile\n"
            f"  Alarms         {api}/api/alerts/alarms  (rules: {', '.join(DEMO_RULES)}; GET /api/alerts/rules)\n"
            f"  Alarm e-mails  {services.get('SENSORMINE_SMTP_MAILDIR', '(no SMTP server)')}  (a Maildir)\n"
            + "".join(f"  API key {t:<7}{k}\n" for t, k in keys.items())
            + f"\nTry:\n  curl -H 'X-API-Key: {keys['acme']}' '{example}'\n"
            f"\nLogs in {logs}. Stop with Ctrl-C (services keep running; `sensormine services down` stops them).\n",
            flush=True,
        )
        _supervise(children, logs, say)
        return 0
    finally:
        for proc in children.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _supervise(children: dict[str, subprocess.Popen], logs: Path, say: Say) -> None:
    try:
        while True:
            for name, proc in children.items():
                if proc.poll() is not None:
                    say(
                        f"{name} exited with {proc.returncode}; last lines of its log:\n{_tail(logs / (name + '.log'))}"
                    )
                    return
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping")


def _check_tenant_partitions(dagster_url: str, say: Say, timeout: float = 120) -> bool:
    """Whether every demo tenant becomes a `tenant` partition of lake/telemetry (the daemon's sensor adds them)."""
    wanted = sorted(DEMO_TENANTS)
    deadline = time.monotonic() + timeout
    with DagsterWebserver(dagster_url) as ui:
        while time.monotonic() < deadline:
            try:
                keys = ui.partition_keys(["lake", "telemetry"], "tenant")
            except (DagsterGraphQLError, httpx.HTTPError, ValueError):
                keys = []  # the code location may still be loading
            if set(wanted) <= set(keys):
                say(f"check passed for the Dagster UI: tenants {', '.join(wanted)} are partitions of lake/telemetry")
                return True
            time.sleep(1)
    return False


def _check_alarm(api: str, key: str, device_key: str, maildir: str | None, say: Say, timeout: float = 90) -> int:
    """0 once a bearing knock sent as motor-1 (POST /api/ingest with its device key) raised the
    `bearing-knock` alarm (GET /api/alerts/alarms) and its e-mail reached the local inbox."""
    knock = json.dumps({"ts": datetime.now(UTC).isoformat(), "values": {"vibration": 12.0}}).encode()
    req = urllib.request.Request(
        f"{api}/api/ingest", data=knock, headers={"X-Device-Key": device_key, "Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        accepted = json.load(resp)["accepted_items"]
    if accepted != 1:
        say(f"check failed: the knock was not accepted ({accepted} items)")
        return 1
    alarms = f"{api}/api/alerts/alarms?device_id=motor-1&rule_id=bearing-knock"
    deadline = time.monotonic() + timeout
    raised = mailed = False
    while time.monotonic() < deadline and not (raised and mailed):
        if not raised:
            try:
                with urllib.request.urlopen(urllib.request.Request(alarms, headers={"X-API-Key": key}), timeout=5) as r:
                    raised = bool(json.load(r)["items"])
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
            if raised:
                say("check passed for alarms: a bearing knock raised bearing-knock on motor-1")
        if raised and not mailed:
            mailed = maildir is None or any(
                "Bearing knock" in (m["Subject"] or "") for m in mailbox.Maildir(maildir, create=False)
            )
            if mailed and maildir is not None:
                say(f"check passed for alarm e-mail: in {maildir}")
        time.sleep(0.5)
    if not (raised and mailed):
        say(f"check failed: {'no e-mail of the alarm' if raised else 'no alarm of the knock'} within {timeout:.0f} s")
        return 1
    return 0


def _check(urls: dict[str, str], key: str, say: Say, timeout: float = 90) -> int:
    """0 once every URL (a query of one simulated device) answers with at least one point."""
    pending = dict(urls)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for label, url in list(pending.items()):
            req = urllib.request.Request(url, headers={"X-API-Key": key})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    body = json.load(resp)
                if body["count"] > 0:
                    say(f"check passed for {label}: {body['count']} point(s) served by the API")
                    del pending[label]
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
        time.sleep(0.5)
    if pending:
        say(f"check failed: no simulated point of {', '.join(pending)} reached the API")
        return 1
    return 0
