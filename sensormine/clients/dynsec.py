"""Device identities at the MQTT broker: a client of Mosquitto's dynamic-security plugin.

Every registered device is a broker client named `{tenant}/{device}` whose password is its device
key, holding one role, `device:{tenant}/{device}`, that may publish to its own telemetry topic
and nowhere else (the plugin's default denies every other publish and every subscription).
Changing a client's password, disabling or deleting it makes the broker drop that client's
connections at once, so a rotated or revoked key stops working immediately.

Commands go as JSON to `$CONTROL/dynamic-security/v1` and are answered on
`$CONTROL/dynamic-security/v1/response`, which every admin session sees: each request is tagged
with its own correlation data. Without admin credentials (`SENSORMINE_MQTT_ADMIN_USERNAME`,
unset for the embedded amqtt broker, which has no such plugin) every operation is a logged
no-op. A `Dynsec` is for one thread at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from sensormine.clients.mqtt import MqttConnectError, make_client, telemetry_topic
from sensormine.settings import Settings, get_settings

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
DEVICE_TEXTNAME = "sensormine device"  # marks the broker clients the registry owns (see `prune`)

_ROLE_EXISTS = "Role already exists"
_CLIENT_EXISTS = "Client already exists"
_CLIENT_NOT_FOUND = "Client not found"
_ROLE_NOT_FOUND = "Role not found"

_skip_logged = False


class DynsecError(RuntimeError):
    """A control request failed: broker unreachable, admin login refused, no answer, or a command error."""


def device_username(tenant_id: str, device_id: str) -> str:
    """The broker user of a device (its password is the device key)."""
    return f"{tenant_id}/{device_id}"


def device_rolename(tenant_id: str, device_id: str) -> str:
    """The broker role holding a device's ACL."""
    return f"device:{tenant_id}/{device_id}"


def parse_device_username(username: str) -> tuple[str, str] | None:
    """(tenant, device) from a device's broker user name, or None for service clients."""
    tenant, sep, device = username.partition("/")
    return (tenant, device) if sep and tenant and device and "/" not in device else None


def device_acls(tenant_id: str, device_id: str) -> list[dict[str, Any]]:
    """A device's ACL: publish to its own telemetry topic; everything else falls to the default (deny)."""
    return [
        {"acltype": "publishClientSend", "topic": telemetry_topic(tenant_id, device_id), "priority": 0, "allow": True}
    ]


@dataclass(frozen=True)
class BrokerClient:
    """What the broker holds about one client."""

    username: str
    disabled: bool
    roles: tuple[str, ...]
    textname: str | None


@dataclass
class _Session:
    """One admin connection: the client and the answers its requests are waiting for."""

    client: mqtt.Client
    cond: threading.Condition = field(default_factory=threading.Condition)
    answers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    refused: dict[int, ReasonCode] = field(default_factory=dict)  # PUBACK failures by message id
    subscribed: list[ReasonCode] = field(default_factory=list)


class Dynsec:
    """Client of the dynamic-security control API, configured by `Settings` (admin user, broker URL)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.timeout = self.settings.dynsec_timeout_s
        self._session: _Session | None = None

    @property
    def enabled(self) -> bool:
        """True when a broker and its dynamic-security admin are configured."""
        return bool(self.settings.mqtt_url and self.settings.mqtt_admin_username)

    def _skip(self, what: str) -> bool:
        """True (and logged) when there is no dynamic security to talk to."""
        global _skip_logged
        if self.enabled:
            return False
        if not _skip_logged:
            log.info(
                "the MQTT broker has no dynamic security configured (SENSORMINE_MQTT_ADMIN_USERNAME unset, e.g. the "
                "embedded amqtt broker): device identities are not provisioned at the broker"
            )
            _skip_logged = True
        log.debug("skipped at the broker: %s", what)
        return True

    # -- connection -----------------------------------------------------------------
    @contextmanager
    def session(self) -> Iterator[Dynsec]:
        """Keep one admin connection open for every request inside the block (nests)."""
        if self._session is not None:
            yield self
            return
        self._session = self._open()
        try:
            yield self
        finally:
            session, self._session = self._session, None
            session.client.disconnect()
            session.client.loop_stop()

    def _open(self) -> _Session:
        user = self.settings.mqtt_admin_username
        try:
            client = make_client(
                "sensormine-dynsec",
                self.settings,
                user,
                self.settings.mqtt_admin_password,
                mqtt5=True,
                timeout=self.timeout,
            )
        except (MqttConnectError, RuntimeError) as exc:
            raise DynsecError(f"cannot log in to the MQTT broker as the dynamic-security admin: {exc}") from exc
        session = _Session(client)

        def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
            try:
                responses = json.loads(msg.payload)["responses"]
                request = str(responses[0].get("correlationData", "")).split(":", 1)[0]
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                log.warning("unreadable dynamic-security response: %r", msg.payload[:200])
                return
            with session.cond:
                session.answers[request] = responses
                session.cond.notify_all()

        def on_publish(_c: mqtt.Client, _u: object, mid: int, reason_code: ReasonCode, _p: object) -> None:
            if reason_code.is_failure:
                with session.cond:
                    session.refused[mid] = reason_code
                    session.cond.notify_all()

        def on_subscribe(_c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object) -> None:
            with session.cond:
                session.subscribed.extend(codes)
                session.cond.notify_all()

        client.on_message = on_message
        client.on_publish = on_publish
        client.on_subscribe = on_subscribe
        client.loop_start()
        try:
            client.subscribe(RESPONSE_TOPIC, qos=1)
            with session.cond:
                if not session.cond.wait_for(lambda: session.subscribed, self.timeout):
                    raise DynsecError(f"the MQTT broker did not acknowledge the subscription to {RESPONSE_TOPIC}")
            if session.subscribed[0].is_failure:
                raise DynsecError(
                    f"user {user!r} may not subscribe to {RESPONSE_TOPIC} ({session.subscribed[0]}): "
                    "is it the dynamic-security admin?"
                )
        except BaseException:
            client.disconnect()
            client.loop_stop()
            raise
        return session

    # -- requests ---------------------------------------------------------------------
    def execute(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send commands in one request; return one response per command (each may hold an "error")."""
        with self.session():
            session = self._session
            assert session is not None
            request = uuid.uuid4().hex
            tagged = [{**c, "correlationData": f"{request}:{i}"} for i, c in enumerate(commands)]
            info = session.client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            deadline = time.monotonic() + self.timeout
            with session.cond:
                while request not in session.answers:
                    if info.mid in session.refused:
                        raise DynsecError(f"the broker refused the control request: {session.refused[info.mid]}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DynsecError(
                            f"no answer on {RESPONSE_TOPIC} within {self.timeout:.0f} s: is Mosquitto's "
                            "dynamic-security plugin loaded?"
                        )
                    session.cond.wait(left)
                responses = session.answers.pop(request)
        if len(responses) != len(commands):
            raise DynsecError(f"expected {len(commands)} responses, got {len(responses)}: {responses}")
        return responses

    def _run(self, commands: list[dict[str, Any]], tolerate: Mapping[int, set[str]] | None = None) -> list[str | None]:
        """Execute; raise on any error not tolerated for that command; return each command's error."""
        responses = self.execute(commands)
        errors: list[str | None] = [r.get("error") for r in responses]
        for i, (cmd, error) in enumerate(zip(commands, errors, strict=True)):
            if error is not None and error not in (tolerate or {}).get(i, set()):
                target = cmd.get("username") or cmd.get("rolename")
                raise DynsecError(f"dynamic-security {cmd['command']}{f' {target}' if target else ''}: {error}")
        return errors

    # -- device identities ------------------------------------------------------------
    def provision_device(self, tenant_id: str, device_id: str, key: str) -> bool:
        """Create or overwrite a device's client (password = `key`, enabled) and its role; False if skipped.

        Overwriting changes the password, so sessions still logged in with an older key are dropped.
        """
        user, role = device_username(tenant_id, device_id), device_rolename(tenant_id, device_id)
        if self._skip(f"provision {user}"):
            return False
        acls = device_acls(tenant_id, device_id)
        with self.session():
            created = self._run(
                [
                    {"command": "createRole", "rolename": role, "acls": acls},
                    {
                        "command": "createClient",
                        "username": user,
                        "password": key,
                        "textname": DEVICE_TEXTNAME,
                        "roles": [{"rolename": role}],
                    },
                ],
                tolerate={0: {_ROLE_EXISTS}, 1: {_CLIENT_EXISTS}},
            )
            fixes: list[dict[str, Any]] = []
            if created[0] is not None:  # an older role of the same name: make its ACL exactly ours
                fixes.append({"command": "modifyRole", "rolename": role, "acls": acls})
            if created[1] is not None:  # an older client of the same name: new key, our role, enabled
                fixes += [
                    {
                        "command": "modifyClient",
                        "username": user,
                        "password": key,
                        "textname": DEVICE_TEXTNAME,
                        "roles": [{"rolename": role}],
                    },
                    {"command": "enableClient", "username": user},
                ]
            if fixes:
                self._run(fixes)
        return True

    def rotate_key(self, tenant_id: str, device_id: str, key: str) -> bool:
        """Set a device's new key (re-enabling it); the old one is refused from now on. False if skipped.

        Works whether or not the broker knew the device, so a rotation also heals a device that was
        registered while the broker was unreachable.
        """
        return self.provision_device(tenant_id, device_id, key)

    def revoke_device(self, tenant_id: str, device_id: str) -> bool:
        """Disable a device's client: it is disconnected and refused until a new key is set. False if skipped."""
        user = device_username(tenant_id, device_id)
        if self._skip(f"revoke {user}"):
            return False
        self._run([{"command": "disableClient", "username": user}], tolerate={0: {_CLIENT_NOT_FOUND}})
        return True

    def delete_device(self, tenant_id: str, device_id: str) -> bool:
        """Delete a device's client and role (disconnecting it); False if skipped."""
        user, role = device_username(tenant_id, device_id), device_rolename(tenant_id, device_id)
        if self._skip(f"delete {user}"):
            return False
        self._run(
            [{"command": "deleteClient", "username": user}, {"command": "deleteRole", "rolename": role}],
            tolerate={0: {_CLIENT_NOT_FOUND}, 1: {_ROLE_NOT_FOUND}},
        )
        return True

    def ensure_device_access(self, tenant_id: str, device_id: str) -> bool:
        """Restore an existing device client's role, ACL and enabled state, leaving its password alone."""
        user, role = device_username(tenant_id, device_id), device_rolename(tenant_id, device_id)
        if self._skip(f"repair {user}"):
            return False
        acls = device_acls(tenant_id, device_id)
        self._run(
            [
                {"command": "createRole", "rolename": role, "acls": acls},
                {"command": "modifyRole", "rolename": role, "acls": acls},
                {
                    "command": "modifyClient",
                    "username": user,
                    "textname": DEVICE_TEXTNAME,
                    "roles": [{"rolename": role}],
                },
                {"command": "enableClient", "username": user},
            ],
            tolerate={0: {_ROLE_EXISTS}},
        )
        return True

    # -- inspection -------------------------------------------------------------------
    def list_clients(self) -> dict[str, BrokerClient]:
        """Every client the broker knows, by user name (empty if skipped)."""
        if self._skip("list clients"):
            return {}
        (resp,) = self.execute([{"command": "listClients", "verbose": True, "count": -1}])
        if "error" in resp:
            raise DynsecError(f"dynamic-security listClients: {resp['error']}")
        return {
            c["username"]: BrokerClient(
                c["username"],
                bool(c.get("disabled", False)),
                tuple(r["rolename"] for r in c.get("roles", [])),
                c.get("textname"),
            )
            for c in resp["data"]["clients"]
        }

    def list_roles(self) -> dict[str, list[dict[str, Any]]]:
        """Every role's ACLs, by role name (empty if skipped)."""
        if self._skip("list roles"):
            return {}
        (resp,) = self.execute([{"command": "listRoles", "verbose": True, "count": -1}])
        if "error" in resp:
            raise DynsecError(f"dynamic-security listRoles: {resp['error']}")
        return {r["rolename"]: list(r.get("acls", [])) for r in resp["data"]["roles"]}
