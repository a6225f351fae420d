"""The device registry: ids, keys (shown once, stored hashed), broker provisioning, the device directory."""

from __future__ import annotations

import enum
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from sensormine.clients.dynsec import (
    DEVICE_TEXTNAME,
    Dynsec,
    DynsecError,
    device_acls,
    device_rolename,
    device_username,
    parse_device_username,
)
from sensormine.identity.secrets import hash_secret
from sensormine.tenancy.tenants import RegistryError, UnknownTenant

log = logging.getLogger(__name__)


DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


DEVICE_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


MAX_DEVICE_NAME = 200


MAX_METADATA_BYTES = 16_384  # compact JSON; migration 013 checks a looser bound as a backstop


class DuplicateDevice(RegistryError):
    """A device id already registered in the tenant."""


class UnknownDevice(RegistryError):
    """No such device in the tenant."""


@dataclass(frozen=True)
class Device:
    """A registered device of one tenant (its key is never part of it: only a hash is stored)."""

    tenant_id: str
    id: str
    name: str
    device_type: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    key_revoked: bool = False


_DEVICE_COLUMNS = (
    "tenant_id, id, name, device_type, metadata, created_at, updated_at, key_hash LIKE 'revoked:%%' AS key_revoked"
)


def check_device_id(device_id: str) -> None:
    """RegistryError unless `device_id` is a valid device id."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise RegistryError(
            f"device id {device_id!r} must be 1-128 of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit"
        )


def check_device_type(device_type: str | None) -> None:
    """RegistryError unless `device_type` is None or a valid type name (it names schemas in URLs too)."""
    if device_type is not None and (not isinstance(device_type, str) or not DEVICE_TYPE_RE.match(device_type)):
        raise RegistryError(
            f"device type {device_type!r} must be 1-128 of A-Z, a-z, 0-9, '_', '.', ':' and '-', "
            "starting with a letter or digit"
        )


def check_device_name(name: str | None) -> None:
    """RegistryError unless `name` is None (the id is used) or 1-200 printable characters."""
    if name is not None and (
        not isinstance(name, str) or not name.strip() or len(name) > MAX_DEVICE_NAME or not name.isprintable()
    ):
        raise RegistryError(f"device name must be 1-{MAX_DEVICE_NAME} printable characters, not blank")


def check_metadata(metadata: Any) -> dict[str, Any]:
    """`metadata` as a dict, or RegistryError unless it is a JSON object of at most 16 KiB."""
    if not isinstance(metadata, dict):
        raise RegistryError(f"device metadata must be a JSON object, got {type(metadata).__name__}")
    try:
        size = len(orjson.dumps(metadata))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise RegistryError(f"device metadata is not JSON: {exc}") from None
    if size > MAX_METADATA_BYTES:
        raise RegistryError(f"device metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are kept")
    return metadata


REVOKED_KEY_PREFIX = "revoked:"  # a revoked device's key_hash: never the SHA-256 of any key


class BrokerUpdate(enum.StrEnum):
    """What became of the MQTT broker's side of a registry change."""

    APPLIED = "applied"
    SKIPPED = "skipped"  # the broker has no dynamic security (embedded amqtt, no admin configured)
    FAILED = "failed"  # unreachable or refused: logged; `sensormine device sync-broker` catches up


def _new_device_key() -> str:
    return "smd_" + secrets.token_urlsafe(24)


def _at_broker(what: str, action: Callable[[Dynsec], bool], broker: Dynsec | None, hint: str) -> BrokerUpdate:
    """Apply a registry change at the broker; a failure is logged (with `hint`), never raised."""
    try:
        return BrokerUpdate.APPLIED if action(broker or Dynsec()) else BrokerUpdate.SKIPPED
    except DynsecError as exc:
        log.warning("%s: the registry is updated but the MQTT broker is not (%s); %s", what, exc, hint)
        return BrokerUpdate.FAILED


def create_device(
    conn: psycopg.Connection,
    tenant_id: str,
    device_id: str,
    name: str | None = None,
    device_type: str | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    broker: Dynsec | None = None,
    at_broker: bool = True,
) -> tuple[Device, str]:
    """Register a device; returns it with its device key (shown once, stored hashed).

    Once the row is written the device is provisioned at the MQTT broker (user `{tenant}/{device}`,
    password = the key, publish to its own topic only). If the broker cannot be reached the device
    still exists and the failure is logged: its key then works over HTTP only, until
    `rotate_device_key` (or `sensormine device sync-broker --rotate-missing`) issues one the broker knows.
    With `at_broker=False` the caller provisions it with `broker_provision` once its own transaction
    has committed (the API does, so that a rolled-back request leaves nothing at the broker).
    A duplicate raises `DuplicateDevice`, an unknown tenant `UnknownTenant` (both RegistryError).
    """
    check_device_id(device_id)
    check_device_type(device_type)
    check_device_name(name)
    metadata = check_metadata(metadata if metadata is not None else {})
    key = _new_device_key()
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO devices (tenant_id, id, name, device_type, key_hash, metadata) "
                f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_DEVICE_COLUMNS}",
                (tenant_id, device_id, name or device_id, device_type, hash_secret(key), Jsonb(metadata)),
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise DuplicateDevice(f"device {device_id!r} already exists in tenant {tenant_id!r}") from None
    except psycopg.errors.ForeignKeyViolation:
        raise UnknownTenant(f"tenant {tenant_id!r} does not exist") from None
    if at_broker:
        broker_provision(tenant_id, device_id, key, broker)
    assert row is not None
    return Device(*row), key


def broker_provision(tenant_id: str, device_id: str, key: str, broker: Dynsec | None = None) -> BrokerUpdate:
    """Provision a registered device at the MQTT broker with `key`; a failure is logged, not raised."""
    return _at_broker(
        f"device {tenant_id}/{device_id} created",
        lambda b: b.provision_device(tenant_id, device_id, key),
        broker,
        f"its key is not valid for MQTT until `sensormine device rotate-key {tenant_id} {device_id}` issues a new one",
    )


def rotate_device_key(conn: psycopg.Connection, tenant_id: str, device_id: str, *, broker: Dynsec | None = None) -> str:
    """Issue a device a new key (shown once, stored hashed); the old one stops working at once.

    The broker is updated inside the registry transaction: if it cannot be, `DynsecError` is
    raised and nothing changes. A revoked device becomes usable again with the new key.
    """
    key = _new_device_key()
    with conn.transaction():
        cur = conn.execute(
            "UPDATE devices SET key_hash = %s WHERE tenant_id = %s AND id = %s",
            (hash_secret(key), tenant_id, device_id),
        )
        if cur.rowcount != 1:
            raise UnknownDevice(f"device {device_id!r} does not exist in tenant {tenant_id!r}")
        (broker or Dynsec()).rotate_key(tenant_id, device_id, key)
    return key


def revoke_device_key(
    conn: psycopg.Connection, tenant_id: str, device_id: str, *, broker: Dynsec | None = None, at_broker: bool = True
) -> BrokerUpdate:
    """Revoke a device's key: refused by HTTP ingest and (disabled) by the broker until `rotate_device_key`.

    The registry change stands even when the broker cannot be reached (logged; `sync-broker`
    disables the device there later). With `at_broker=False` the caller runs `broker_revoke` after
    its transaction commits (SKIPPED is returned here).
    """
    with conn.transaction():
        cur = conn.execute(
            "UPDATE devices SET key_hash = %s WHERE tenant_id = %s AND id = %s",
            (REVOKED_KEY_PREFIX + secrets.token_hex(16), tenant_id, device_id),
        )
        if cur.rowcount != 1:
            raise UnknownDevice(f"device {device_id!r} does not exist in tenant {tenant_id!r}")
    return broker_revoke(tenant_id, device_id, broker) if at_broker else BrokerUpdate.SKIPPED


def broker_revoke(tenant_id: str, device_id: str, broker: Dynsec | None = None) -> BrokerUpdate:
    """Disable a revoked device at the MQTT broker; a failure is logged, not raised."""
    return _at_broker(
        f"key of device {tenant_id}/{device_id} revoked",
        lambda b: b.revoke_device(tenant_id, device_id),
        broker,
        "run `sensormine device sync-broker` to disable it there",
    )


def delete_device(
    conn: psycopg.Connection, tenant_id: str, device_id: str, *, broker: Dynsec | None = None, at_broker: bool = True
) -> BrokerUpdate:
    """Delete a device (its profile and status go with it) and its broker client and role.

    Its telemetry stays. With `at_broker=False` the caller runs `broker_delete` after its
    transaction commits (SKIPPED is returned here).
    """
    with conn.transaction():
        cur = conn.execute("DELETE FROM devices WHERE tenant_id = %s AND id = %s", (tenant_id, device_id))
        if cur.rowcount != 1:
            raise UnknownDevice(f"device {device_id!r} does not exist in tenant {tenant_id!r}")
    return broker_delete(tenant_id, device_id, broker) if at_broker else BrokerUpdate.SKIPPED


def broker_delete(tenant_id: str, device_id: str, broker: Dynsec | None = None) -> BrokerUpdate:
    """Remove a deleted device's client and role from the MQTT broker; a failure is logged, not raised."""
    return _at_broker(
        f"device {tenant_id}/{device_id} deleted",
        lambda b: b.delete_device(tenant_id, device_id),
        broker,
        "run `sensormine device sync-broker --prune` to remove it there",
    )


@dataclass
class BrokerSyncReport:
    """What `sync_broker` found and did, by broker user name (`{tenant}/{device}`)."""

    skipped: bool = False  # the broker has no dynamic security: nothing was compared
    checked: int = 0  # registered devices compared with the broker
    repaired: list[str] = field(default_factory=list)  # role, ACL or enabled state restored
    disabled: list[str] = field(default_factory=list)  # revoked in the registry, now disabled at the broker
    missing: list[str] = field(default_factory=list)  # unknown to the broker, key left as it was
    rotated: dict[str, str] = field(default_factory=dict)  # unknown to the broker: new key issued
    pruned: list[str] = field(default_factory=list)  # device clients the registry no longer has


def sync_broker(
    conn: psycopg.Connection,
    *,
    broker: Dynsec | None = None,
    rotate_missing: bool = False,
    prune: bool = False,
) -> BrokerSyncReport:
    """Make the broker's device clients match the registry.

    Repairs roles, ACLs and enabled state, and disables revoked devices, without touching
    passwords. Keys are stored hashed, so a device the broker does not know at all (registered
    while it was unreachable, or a broker state reset) cannot get its key back: it is listed in
    `missing`, or with `rotate_missing` given a new key (in `rotated`, shown once). `prune`
    deletes device clients (and roles) whose device is no longer registered.
    """
    broker = broker or Dynsec()
    report = BrokerSyncReport()
    if not broker.enabled:
        report.skipped = True
        return report
    rows = conn.execute("SELECT tenant_id, id, key_hash FROM devices ORDER BY tenant_id, id").fetchall()
    with broker.session():
        clients, roles = broker.list_clients(), broker.list_roles()
        for tenant_id, device_id, key_hash in rows:
            report.checked += 1
            user = device_username(tenant_id, device_id)
            client = clients.get(user)
            if key_hash.startswith(REVOKED_KEY_PREFIX):
                if client is not None and not client.disabled:
                    broker.revoke_device(tenant_id, device_id)
                    report.disabled.append(user)
            elif client is None:
                if rotate_missing:
                    report.rotated[user] = rotate_device_key(conn, tenant_id, device_id, broker=broker)
                else:
                    report.missing.append(user)
            else:
                role = device_rolename(tenant_id, device_id)
                if client.disabled or role not in client.roles or roles.get(role) != device_acls(tenant_id, device_id):
                    broker.ensure_device_access(tenant_id, device_id)
                    report.repaired.append(user)
        if prune:
            registered = {device_username(t, d) for t, d, _ in rows}
            for user, client in clients.items():
                owner = parse_device_username(user)
                if owner is not None and client.textname == DEVICE_TEXTNAME and user not in registered:
                    broker.delete_device(*owner)
                    report.pruned.append(user)
    return report


def list_devices(conn: psycopg.Connection, tenant_ids: list[str]) -> list[Device]:
    """Devices of the given tenants."""
    rows = conn.execute(
        "SELECT tenant_id, id, name, device_type FROM devices WHERE tenant_id = ANY(%s) ORDER BY tenant_id, id",
        (tenant_ids,),
    ).fetchall()
    return [Device(*r) for r in rows]


def get_device(conn: psycopg.Connection, tenant_id: str, device_id: str) -> Device | None:
    """One device of a tenant, or None."""
    row = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = %s AND id = %s", (tenant_id, device_id)
    ).fetchone()
    return Device(*row) if row else None


def page_devices(
    conn: psycopg.Connection,
    tenant_ids: Iterable[str],
    *,
    device_type: str | None = None,
    after: tuple[str, str] | None = None,
    limit: int = 100,
) -> list[Device]:
    """Up to `limit` devices of the given tenants in (tenant, id) order, after the key `after`; of one type if given."""
    tenant_list = sorted(set(tenant_ids))
    a_tenant, a_id = after if after else (None, None)
    rows = conn.execute(
        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = ANY(%(t)s) "
        "AND (%(type)s::text IS NULL OR device_type = %(type)s) "
        "AND (%(at)s::text IS NULL OR (tenant_id, id) > (%(at)s, %(aid)s)) "
        "ORDER BY tenant_id, id LIMIT %(limit)s",
        {"t": tenant_list, "type": device_type, "at": a_tenant, "aid": a_id, "limit": limit},
    ).fetchall()
    return [Device(*r) for r in rows]


_UNSET: Any = object()


def update_device(
    conn: psycopg.Connection,
    tenant_id: str,
    device_id: str,
    *,
    name: str | None = _UNSET,
    device_type: str | None = _UNSET,
    metadata: dict[str, Any] | None = None,
) -> tuple[Device, Device]:
    """Change a device's name, type (None clears it) or metadata; returns (before, after).

    `metadata` is merged into the stored object: its keys replace the stored ones, and a key whose
    value is None is removed (JSON merge patch, RFC 7396, one level deep). The key is not touched.
    A new type takes effect for schema validation when the consumer next reloads (within 30 s).
    """
    if name is not _UNSET:
        if name is None:
            raise RegistryError("device name cannot be null; omit it to keep the current one")
        check_device_name(name)
    if device_type is not _UNSET:
        check_device_type(device_type)
    if metadata is not None:
        check_metadata(metadata)
    with conn.transaction():
        row = conn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE tenant_id = %s AND id = %s FOR UPDATE",
            (tenant_id, device_id),
        ).fetchone()
        if row is None:
            raise UnknownDevice(f"device {device_id!r} does not exist in tenant {tenant_id!r}")
        before = Device(*row)
        merged = dict(before.metadata)
        for key, value in (metadata or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        check_metadata(merged)
        row = conn.execute(
            "UPDATE devices SET name = %s, device_type = %s, metadata = %s WHERE tenant_id = %s AND id = %s "
            f"RETURNING {_DEVICE_COLUMNS}",
            (
                before.name if name is _UNSET else name,
                before.device_type if device_type is _UNSET else device_type,
                Jsonb(merged),
                tenant_id,
                device_id,
            ),
        ).fetchone()
    assert row is not None
    return before, Device(*row)


@dataclass(frozen=True)
class KeyHolder:
    """The device holding a device key, and whose plan (and quota) applies to its tenant."""

    tenant_id: str
    device_id: str
    quota_tenant: str
    plan: str


def device_key_holder(conn: psycopg.Connection, key: str) -> KeyHolder | None:
    """The device holding `key` with its tenant's quota tenant and plan (one statement), or None."""
    if not key.startswith("smd_"):
        return None
    row = conn.execute(
        "SELECT tenant_id, id, sensormine_quota_tenant(tenant_id), sensormine_effective_plan(tenant_id) "
        "FROM devices WHERE key_hash = %s",
        (hash_secret(key),),
    ).fetchone()
    return None if row is None else KeyHolder(*row)


def resolve_device_key(conn: psycopg.Connection, key: str) -> tuple[str, str] | None:
    """(tenant_id, device_id) of the device holding `key`, or None."""
    holder = device_key_holder(conn, key)
    return None if holder is None else (holder.tenant_id, holder.device_id)


class DeviceDirectory:
    """In-memory set of registered (tenant, device) pairs for the ingest hot path.

    Refreshed every `ttl_s`, and at most once per `miss_refresh_s` on an unknown pair, so a
    newly created device is accepted within a second while a flood of unknown topics costs
    one query per interval.
    """

    def __init__(
        self, connect: Callable[[], psycopg.Connection], ttl_s: float = 30.0, miss_refresh_s: float = 1.0
    ) -> None:
        self._connect = connect
        self._ttl_s = ttl_s
        self._miss_refresh_s = miss_refresh_s
        self._known: frozenset[tuple[str, str]] = frozenset()
        self._loaded_at = 0.0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Reload the registry (raises when the database is unreachable)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT tenant_id, id FROM devices").fetchall()
        with self._lock:
            self._known = frozenset((t, d) for t, d in rows)
            self._loaded_at = time.monotonic()

    def _refresh_or_keep(self) -> None:
        # During a database outage the daemon keeps working from the last list it loaded (its
        # readings go to the store-and-forward buffer); it retries at the next interval.
        try:
            self.refresh()
        except psycopg.Error as exc:
            log.warning("device registry unreachable, keeping the last %d devices: %s", len(self._known), exc)
            with self._lock:
                self._loaded_at = time.monotonic()

    def contains(self, tenant_id: str, device_id: str) -> bool:
        """Whether the device is registered under the tenant."""
        now = time.monotonic()
        if now - self._loaded_at > self._ttl_s:
            self._refresh_or_keep()
        if (tenant_id, device_id) in self._known:
            return True
        if now - self._loaded_at > self._miss_refresh_s:
            self._refresh_or_keep()
            return (tenant_id, device_id) in self._known
        return False
