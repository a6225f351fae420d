"""MQTT broker: Debian's Mosquitto (or the pure-Python `amqtt` broker with --embedded)."""

from __future__ import annotations

import pwd
import socket
import sys
from pathlib import Path

from sensormine.services import process, system
from sensormine.services.base import EMBEDDED_HINT, Progress, Record, Service


def _mosquitto_conf(port: int, log: Path) -> str:
    return "\n".join(
        [
            "# written by `sensormine services up`; overwritten on every start",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            # Benchmarks publish bursts to slow subscribers; don't drop QoS>0 messages early.
            "max_queued_messages 100000",
            "set_tcp_nodelay true",
            # Benchmarks open many connections; one log line each is noise (and disk I/O).
            "connection_messages false",
            f"log_dest file {log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "",
        ]
    )


def _amqtt_conf(port: int) -> str:
    # No packet/event logger plugins: they log every message and cripple throughput.
    return "\n".join(
        [
            "listeners:",
            "  default:",
            "    type: tcp",
            f"    bind: 127.0.0.1:{port}",
            "plugins:",
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:",
            "    allow_anonymous: true",
            "",
        ]
    )


def mqtt_connack(port: int, timeout: float = 2.0) -> bool:
    """Send a bare MQTT 3.1.1 CONNECT and check for a successful CONNACK."""
    client_id = b"sensormine-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive 10 s
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\x10" + bytes([len(body)]) + body)
        reply = s.recv(4)
        ok = reply[:1] == b"\x20" and reply[3:4] == b"\x00"
        s.sendall(b"\xe0\x00")  # DISCONNECT
        return ok


class Mosquitto(Service):
    """Anonymous MQTT on loopback, no persistence."""

    name = "mosquitto"
    ready_timeout = 30.0
    has_embedded = True

    def drops_privileges(self) -> bool:
        """Mosquitto started as root switches to the mosquitto user (amqtt does not)."""
        return not self.embedded

    def requirements(self) -> list[system.Requirement]:
        """Debian `mosquitto` (plus the CLI clients) unless embedded."""
        return [] if self.embedded else [system.binary("mosquitto", ("mosquitto", "mosquitto-clients"), EMBEDDED_HINT)]

    def start(self, previous: Record | None, progress: Progress) -> Record:
        """Write the config and spawn the broker."""
        port = process.free_port(previous.port if previous else None)
        log = self.dir / "mosquitto.log"
        if self.embedded:
            conf = self.dir / "amqtt.yaml"
            conf.write_text(_amqtt_conf(port))
            cmd: list[str | Path] = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", conf]
            progress(f"mosquitto: starting the embedded amqtt broker on 127.0.0.1:{port} ...")
        else:
            exe = system.which("mosquitto")
            assert exe is not None  # requirements() were ensured by `up`
            conf = self.dir / "mosquitto.conf"
            conf.write_text(_mosquitto_conf(port, log))
            log.touch()
            if system.is_root():
                # Started as root, mosquitto drops to the `mosquitto` user before it opens
                # its log, so that user must reach and own the service dir.
                try:
                    user = pwd.getpwnam("mosquitto")
                except KeyError:
                    user = None
                if user is not None:
                    system.ensure_reachable(self.dir, user, self.state_root)
                    system.chown_tree(self.dir, user)
            cmd = [exe, "-c", conf]
            progress(f"mosquitto: starting on 127.0.0.1:{port} ...")
        # Early failures (bad config) go to stderr; send them to the same log file.
        proc = process.spawn(cmd, log=log, cwd=self.dir)
        return self.record(proc.pid, port, f"mqtt://127.0.0.1:{port}", log)

    def probe(self, rec: Record) -> bool:
        """MQTT CONNECT/CONNACK round trip."""
        return mqtt_connack(rec.port)

    def answers(self, rec: Record) -> bool:
        """A real CONNECT: a bare TCP connect makes amqtt log an error each time."""
        return mqtt_connack(rec.port)

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_MQTT_URL."""
        return {"SENSORMINE_MQTT_URL": rec.url}
