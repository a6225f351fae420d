"""Tenants, devices and API keys. Secrets are generated here, shown once, and stored hashed."""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from sensormine.plans import PLANS

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class RegistryError(ValueError):
    """A registry request that cannot be honoured (bad id, unknown parent, duplicate)."""


@dataclass(frozen=True)
class Tenant:
    """A tenant; `parent_id` is set for sub-tenants."""

    id: str
    name: str
    parent_id: str | None
    plan: str


@dataclass(frozen=True)
class Device:
    """A registered device of one tenant."""

    tenant_id: str
    id: str
    name: str
    device_type: str | None


def hash_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (keys are random, so no slow KDF is needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(
    conn: psycopg.Connection, tenant_id: str, name: str | None = None, parent_id: str | None = None, plan: str = "free"
) -> Tenant:
    """Create a tenant, optionally under a parent."""
    if not TENANT_ID_RE.match(tenant_id):
        raise RegistryError(
            f"tenant id {tenant_id!r} must be 1-63 of a-z, 0-9 and '-', starting with a letter or digit"
        )
    if plan not in PLANS:
        raise RegistryError(f"plan must be one of {', '.join(PLANS)}")
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO tenants (id, name, parent_id, plan) VALUES (%s, %s, %s, %s)",
                (tenant_id, name or tenant_id, parent_id, plan),
            )
    except psycopg.errors.UniqueViolation:
        raise RegistryError(f"tenant {tenant_id!r} already exists") from None
    except psycopg.errors.ForeignKeyViolation:
        raise RegistryError(f"parent tenant {parent_id!r} does not exist") from None
    return Tenant(tenant_id, name or tenant_id, parent_id, plan)


def get_tenant(conn: psycopg.Connection, tenant_id: str) -> Tenant | None:
    """One tenant, or None."""
    row = conn.execute("SELECT id, name, parent_id, plan FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    return Tenant(*row) if row else None


def list_tenants(conn: psycopg.Connection) -> list[Tenant]:
    """All tenants, parents before children."""
    rows = conn.execute("SELECT id, name, parent_id, plan FROM tenants ORDER BY parent_id NULLS FIRST, id").fetchall()
    return [Tenant(*r) for r in rows]


def visible_tenant_ids(conn: psycopg.Connection, tenant_id: str) -> list[str]:
    """A tenant and all its descendants: what it may read."""
    rows = conn.execute(
        "WITH RECURSIVE t AS (SELECT id FROM tenants WHERE id = %s "
        "UNION ALL SELECT c.id FROM tenants c JOIN t ON c.parent_id = t.id) SELECT id FROM t",
        (tenant_id,),
    ).fetchall()
    return [r[0] for r in rows]


def create_device(
    conn: psycopg.Connection, tenant_id: str, device_id: str, name: str | None = None, device_type: str | None = None
) -> tuple[Device, str]:
    """Register a device; returns it with its device key (shown once, stored hashed)."""
    if not DEVICE_ID_RE.match(device_id):
        raise RegistryError(f"device id {device_id!r} must be 1-128 of A-Z, a-z, 0-9, '_' and '-'")
    key = "smd_" + secrets.token_urlsafe(24)
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO devices (tenant_id, id, name, device_type, key_hash) VALUES (%s, %s, %s, %s, %s)",
                (tenant_id, device_id, name or device_id, device_type, hash_secret(key)),
            )
    except psycopg.errors.UniqueViolation:
        raise RegistryError(f"device {device_id!r} already exists in tenant {tenant_id!r}") from None
    except psycopg.errors.ForeignKeyViolation:
        raise RegistryError(f"tenant {tenant_id!r} does not exist") from None
    return Device(tenant_id, device_id, name or device_id, device_type), key


def list_devices(conn: psycopg.Connection, tenant_ids: list[str]) -> list[Device]:
    """Devices of the given tenants."""
    rows = conn.execute(
        "SELECT tenant_id, id, name, device_type FROM devices WHERE tenant_id = ANY(%s) ORDER BY tenant_id, id",
        (tenant_ids,),
    ).fetchall()
    return [Device(*r) for r in rows]


def create_api_key(
    conn: psycopg.Connection, tenant_id: str, name: str = "default", scopes: tuple[str, ...] = ("read", "write")
) -> str:
    """Issue an API key for a tenant; the returned secret is shown once and stored hashed."""
    key_id = secrets.token_hex(6)
    key = f"smk_{key_id}_{secrets.token_urlsafe(24)}"
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO api_keys (id, tenant_id, name, key_hash, scopes) VALUES (%s, %s, %s, %s, %s)",
                (key_id, tenant_id, name, hash_secret(key), list(scopes)),
            )
    except psycopg.errors.ForeignKeyViolation:
        raise RegistryError(f"tenant {tenant_id!r} does not exist") from None
    return key


def resolve_api_key(conn: psycopg.Connection, key: str) -> tuple[str, list[str]] | None:
    """(tenant_id, scopes) of a valid, unrevoked API key, or None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "smk":
        return None
    row = conn.execute(
        "SELECT tenant_id, scopes, key_hash FROM api_keys WHERE id = %s AND revoked_at IS NULL", (parts[1],)
    ).fetchone()
    if row is None or not secrets.compare_digest(row[2], hash_secret(key)):
        return None
    return row[0], list(row[1])


def resolve_device_key(conn: psycopg.Connection, key: str) -> tuple[str, str] | None:
    """(tenant_id, device_id) of the device holding `key`, or None."""
    if not key.startswith("smd_"):
        return None
    row = conn.execute("SELECT tenant_id, id FROM devices WHERE key_hash = %s", (hash_secret(key),)).fetchone()
    return None if row is None else (row[0], row[1])


def revoke_api_key(conn: psycopg.Connection, key_id: str) -> bool:
    """Revoke an API key by its id; True when one was revoked."""
    with conn.transaction():
        cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL", (key_id,))
    return cur.rowcount == 1


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
        """Reload the registry."""
        with self._connect() as conn:
            rows = conn.execute("SELECT tenant_id, id FROM devices").fetchall()
        with self._lock:
            self._known = frozenset((t, d) for t, d in rows)
            self._loaded_at = time.monotonic()

    def contains(self, tenant_id: str, device_id: str) -> bool:
        """Whether the device is registered under the tenant."""
        now = time.monotonic()
        if now - self._loaded_at > self._ttl_s:
            self.refresh()
        if (tenant_id, device_id) in self._known:
            return True
        if now - self._loaded_at > self._miss_refresh_s:
            self.refresh()
            return (tenant_id, device_id) in self._known
        return False
