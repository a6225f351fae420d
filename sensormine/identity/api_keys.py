"""API keys: generated here, shown once, stored hashed; resolved to a tenant and scopes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from sensormine.identity.secrets import hash_secret
from sensormine.tenancy.tenants import RegistryError


def create_api_key(
    conn: psycopg.Connection,
    tenant_id: str,
    name: str = "default",
    scopes: tuple[str, ...] = ("read", "write"),
    role: str = "operator",
    created_by: str | None = None,
) -> str:
    """Issue an API key for a tenant; the returned secret (`smk_<id>_<secret>`) is shown once and stored hashed.

    The key acts with `role`; its scopes narrow the role's permissions (see `sensormine.auth`).
    """
    key_id = secrets.token_hex(6)
    key = f"smk_{key_id}_{secrets.token_urlsafe(24)}"
    try:
        with conn.transaction():
            conn.execute(
                "INSERT INTO api_keys (id, tenant_id, name, key_hash, scopes, role, created_by) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (key_id, tenant_id, name, hash_secret(key), list(scopes), role, created_by),
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


def revoke_api_key(conn: psycopg.Connection, key_id: str) -> bool:
    """Revoke an API key by its id; True when one was revoked."""
    with conn.transaction():
        cur = conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL", (key_id,))
    return cur.rowcount == 1


_KEY_COLUMNS = "id, tenant_id, name, role, scopes, created_by, created_at, revoked_at"


@dataclass(frozen=True)
class ApiKeyRecord:
    """An API key as stored, without its secret."""

    id: str
    tenant_id: str
    name: str
    role: str
    scopes: list[str]
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None


def get_api_key(conn: psycopg.Connection, key_id: str) -> ApiKeyRecord | None:
    """One API key (in the caller's row-level-security scope), or None."""
    row = conn.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = %s", (key_id,)).fetchone()
    return ApiKeyRecord(*row) if row else None


def page_api_keys(
    conn: psycopg.Connection, tenant_ids: list[str], after: str | None, limit: int, include_revoked: bool = False
) -> list[ApiKeyRecord]:
    """API keys of the tenants by id after `after`, at most `limit`; revoked ones only when asked."""
    rows = conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = ANY(%(t)s) "
        "AND (%(revoked)s OR revoked_at IS NULL) AND (%(after)s::text IS NULL OR id > %(after)s) "
        "ORDER BY id LIMIT %(n)s",
        {"t": tenant_ids, "revoked": include_revoked, "after": after, "n": limit},
    ).fetchall()
    return [ApiKeyRecord(*r) for r in rows]
