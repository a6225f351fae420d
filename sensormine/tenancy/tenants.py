"""The tenant registry: tenants and sub-tenants, and which tenants a tenant may read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from sensormine.tenancy.plans import PLANS

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class RegistryError(ValueError):
    """A registry request that cannot be honoured (bad id, unknown parent, duplicate)."""


class UnknownTenant(RegistryError):
    """No such tenant."""


@dataclass(frozen=True)
class Tenant:
    """A tenant; `parent_id` is set for sub-tenants, `plan` is None for one inheriting its parent's plan."""

    id: str
    name: str
    parent_id: str | None
    plan: str | None


def create_tenant(
    conn: psycopg.Connection,
    tenant_id: str,
    name: str | None = None,
    parent_id: str | None = None,
    plan: str | None = None,
) -> Tenant:
    """Create a tenant, optionally under a parent.

    Without a plan a top-level tenant is on the free plan and a sub-tenant inherits its parent's
    plan (sharing its quota); `Tenant.plan` is then None.
    """
    if not TENANT_ID_RE.match(tenant_id):
        raise RegistryError(
            f"tenant id {tenant_id!r} must be 1-63 of a-z, 0-9 and '-', starting with a letter or digit"
        )
    if plan is None and parent_id is None:
        plan = "free"
    if plan is not None and plan not in PLANS:
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


_RECORD_COLUMNS = "id, name, parent_id, plan, settings, features, branding, created_at, updated_at"


@dataclass(frozen=True)
class TenantRecord:
    """A tenant's own row: its overrides (settings, features, branding), not what it inherits."""

    id: str
    name: str
    parent_id: str | None
    plan: str | None
    settings: dict[str, Any]
    features: dict[str, bool]
    branding: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def get_tenant_record(conn: psycopg.Connection, tenant_id: str) -> TenantRecord | None:
    """One tenant's row (in the caller's row-level-security scope), or None."""
    row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    return TenantRecord(*row) if row else None


def page_tenants(
    conn: psycopg.Connection, after: str | None, limit: int, *, parent_id: str | None = None
) -> list[TenantRecord]:
    """Tenants by id after `after` (only the children of `parent_id` when given), at most `limit`."""
    rows = conn.execute(
        f"SELECT {_RECORD_COLUMNS} FROM tenants WHERE (%(p)s::text IS NULL OR parent_id = %(p)s) "
        "AND (%(after)s::text IS NULL OR id > %(after)s) ORDER BY id LIMIT %(n)s",
        {"p": parent_id, "after": after, "n": limit},
    ).fetchall()
    return [TenantRecord(*r) for r in rows]


def parent_of(conn: psycopg.Connection, tenant_id: str) -> str | None:
    """The parent of a tenant (None for a top-level one); UnknownTenant when it does not exist."""
    row = conn.execute("SELECT parent_id FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    if row is None:
        raise UnknownTenant(f"tenant {tenant_id!r} not found")
    return row[0]
