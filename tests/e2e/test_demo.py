"""`sensormine demo` starts: simulated MQTT, OPC UA and Modbus readings reach the API; tenants become partitions;
a knock raises an alarm whose e-mail reaches the local inbox."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_serves_simulated_readings(services: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORMINE_") or k == "SENSORMINE_STATE_DIR"}
    env["SENSORMINE_MQTT_SESSION_EXPIRY_S"] = "60"  # the shared test broker need not queue for it for a day
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "demo",
        "--check",
        "--port",
        str(free_port()),
        "--dagster-port",
        str(free_port()),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A knock sent as motor-1 raised its alarm, and the e-mail reached the local inbox.
    assert "check passed for alarms: a bearing knock raised" in proc.stdout, proc.stdout[-3000:]
    assert "check passed for alarm e-mail" in proc.stdout, proc.stdout[-3000:]
    for device in ("motor-1 (MQTT)", "press-motor (OPC UA)", "line-plc (Modbus)"):
        assert f"check passed for {device}" in proc.stdout, proc.stdout[-3000:]
    # The daemon's tenant sensor made the seeded tenants partitions (it failed every tick once).
    assert "check passed for the Dagster UI: tenants acme, globex are partitions" in proc.stdout, proc.stdout[-3000:]
