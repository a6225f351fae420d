"""MQTT broker: Debian's Mosquitto with dynamic security (or the anonymous `amqtt` broker with --embedded).

Mosquitto loads its dynamic-security plugin, which keeps users, roles and ACLs in
`dynamic-security.json` in the service dir, and refuses anonymous clients. On the first start the
launcher writes that file with three clients, whose passwords it keeps in `credentials.json` and
exports as SENSORMINE_MQTT_* settings:

- `sensormine-admin`: the plugin's control API only (the registry provisions devices through it);
- `sensormine-ingest`: the ingest daemon; subscribes to every telemetry topic, publishes nowhere;
- `sensormine-tools`: publishes and subscribes on `sensormine/#`, for tests, benchmarks and tools.

Both files survive restarts (devices provisioned at the broker stay); the config is rewritten on
every start. amqtt has no such plugin: the embedded broker stays anonymous and exports no users.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import pwd
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from sensormine.services import process, system
from sensormine.services.base import EMBEDDED_HINT, Progress, Record, Service

DYNSEC_FILE = "dynamic-security.json"
CREDENTIALS_FILE = "credentials.json"
# Service clients the launcher creates: credentials.json key -> (user name, SENSORMINE_* prefix).
ACCOUNTS = {
    "admin": ("sensormine-admin", "SENSORMINE_MQTT_ADMIN_"),
    "ingest": ("sensormine-ingest", "SENSORMINE_MQTT_"),
    "tools": ("sensormine-tools", "SENSORMINE_MQTT_TOOLS_"),
}
# OWASP's figure for PBKDF2-HMAC-SHA512; the broker's own default (mosquitto_ctrl, and every client created
# over $CONTROL, i.e. every device) is 101 in Mosquitto 2.0, which cannot be raised per request there.
# Device keys are 192-bit random tokens, so 101 iterations still leave offline guessing hopeless.
PBKDF2_ITERATIONS = 210_000
_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",  # Debian multiarch
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)


def dynsec_plugin() -> str | None:
    """Path of Mosquitto's dynamic-security plugin (shipped in Debian's `mosquitto` package), or None."""
    for pattern in _PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _pw_hash(password: str) -> dict[str, Any]:
    """The plugin's stored form of a password: PBKDF2-HMAC-SHA512 with a 12-byte salt, base64."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PBKDF2_ITERATIONS,
    }


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def dynsec_config(credentials: dict[str, str]) -> dict[str, Any]:
    """The plugin's initial state: the admin, ingest and tools clients and their roles; deny by default."""
    roles = {
        "admin": [
            _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
            _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
            _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
            _acl("publishClientReceive", "$SYS/#"),
            _acl("subscribePattern", "$SYS/#"),
        ],
        "ingest": [
            _acl("subscribePattern", "sensormine/+/+/telemetry"),
            _acl("publishClientReceive", "sensormine/+/+/telemetry"),
        ],
        "tools": [
            _acl("publishClientSend", "sensormine/#"),
            _acl("publishClientReceive", "sensormine/#"),
            _acl("subscribePattern", "sensormine/#"),
        ],
    }
    return {
        "clients": [
            {
                "username": user,
                "textname": f"sensormine {account} (created by `sensormine services up`)",
                **_pw_hash(credentials[account]),
                "roles": [{"rolename": user}],
            }
            for account, (user, _) in ACCOUNTS.items()
        ],
        "roles": [{"rolename": ACCOUNTS[account][0], "acls": acls} for account, acls in roles.items()],
        "defaultACLAccess": {
            "publishClientSend": False,  # devices publish to their own topic only, through their role
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def _mosquitto_conf(port: int, log: Path, plugin: str, dynsec_file: Path) -> str:
    return "\n".join(
        [
            "# written by `sensormine services up`; overwritten on every start",
            f"listener {port} 127.0.0.1",
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {dynsec_file}",
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


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connack(port: int, timeout: float = 2.0, username: str | None = None, password: str | None = None) -> bool:
    """Send a bare MQTT 3.1.1 CONNECT (with credentials, if given) and check for a successful CONNACK."""
    flags = 0x02  # clean session
    payload = _utf8("sensormine-probe")
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x0a" + payload  # level 4, keepalive 10 s
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\x10" + _remaining_length(len(body)) + body)
        reply = s.recv(4)
        ok = reply[:1] == b"\x20" and reply[3:4] == b"\x00"
        s.sendall(b"\xe0\x00")  # DISCONNECT
        return ok


class Mosquitto(Service):
    """MQTT on loopback, no message persistence; users and ACLs from the dynamic-security plugin."""

    name = "mosquitto"
    ready_timeout = 30.0
    has_embedded = True

    def drops_privileges(self) -> bool:
        """Mosquitto started as root switches to the mosquitto user (amqtt does not)."""
        return not self.embedded

    def requirements(self) -> list[system.Requirement]:
        """Debian `mosquitto` (plus the CLI clients, and its dynamic-security plugin) unless embedded."""
        if self.embedded:
            return []
        return [
            system.binary("mosquitto", ("mosquitto", "mosquitto-clients"), EMBEDDED_HINT),
            system.Requirement(
                "mosquitto_dynamic_security.so", ("mosquitto",), dynsec_plugin, "Mosquitto 2.0 or later ships it."
            ),
        ]

    @property
    def dynsec_file(self) -> Path:
        """The plugin's state: users, roles, ACLs (written by the broker on every change)."""
        return self.dir / DYNSEC_FILE

    @property
    def credentials_file(self) -> Path:
        """Passwords of the launcher's service clients (mode 0600)."""
        return self.dir / CREDENTIALS_FILE

    def credentials(self) -> dict[str, str] | None:
        """{"admin"|"ingest"|"tools": password} of the service clients, or None if not initialised."""
        try:
            data = json.loads(self.credentials_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not all(isinstance(data.get(a), str) for a in ACCOUNTS):
            return None
        return {a: data[a] for a in ACCOUNTS}

    def init_dynsec(self, progress: Progress) -> None:
        """Create the plugin's state and the service clients' passwords, unless both already exist."""
        if self.credentials() is not None and self.dynsec_file.exists():
            return
        if self.dynsec_file.exists():
            progress(
                f"mosquitto: {self.credentials_file} is missing or unreadable; re-initialising dynamic security "
                "(devices provisioned at the broker are forgotten: `sensormine device sync-broker --rotate-missing`)"
            )
        credentials = {account: secrets.token_urlsafe(24) for account in ACCOUNTS}
        system.write_private(self.dynsec_file, json.dumps(dynsec_config(credentials), indent=2) + "\n")
        system.write_private(self.credentials_file, json.dumps(credentials, indent=2) + "\n")
        progress(f"mosquitto: dynamic security initialised in {self.dynsec_file} (admin, ingest and tools users)")

    def _probe_login(self, rec: Record) -> tuple[str | None, str | None]:
        """Credentials for a probe CONNECT: the admin's when the broker runs with dynamic security."""
        if not rec.extra.get("dynsec"):
            return None, None
        creds = self.credentials()
        return (ACCOUNTS["admin"][0], creds["admin"]) if creds else (ACCOUNTS["admin"][0], "")

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
            exe, plugin = system.which("mosquitto"), dynsec_plugin()
            assert exe is not None and plugin is not None  # requirements() were ensured by `up`
            self.init_dynsec(progress)
            conf = self.dir / "mosquitto.conf"
            conf.write_text(_mosquitto_conf(port, log, plugin, self.dynsec_file))
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
        extra = {} if self.embedded else {"dynsec": True}
        return self.record(proc.pid, port, f"mqtt://127.0.0.1:{port}", log, extra=extra)

    def probe(self, rec: Record) -> bool:
        """MQTT CONNECT/CONNACK round trip (as the admin user under dynamic security)."""
        return mqtt_connack(rec.port, 2.0, *self._probe_login(rec))

    def answers(self, rec: Record) -> bool:
        """A real CONNECT: a bare TCP connect makes amqtt log an error each time."""
        return mqtt_connack(rec.port, 2.0, *self._probe_login(rec))

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_MQTT_URL, plus each service client's user and password under dynamic security."""
        env = {"SENSORMINE_MQTT_URL": rec.url}
        creds = self.credentials() if rec.extra.get("dynsec") else None
        if creds is not None:
            for account, (user, prefix) in ACCOUNTS.items():
                env[f"{prefix}USERNAME"] = user
                env[f"{prefix}PASSWORD"] = creds[account]
        return env
