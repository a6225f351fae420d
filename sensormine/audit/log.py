"""The audit log: who changed what, written in the same transaction as the change."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb


class Author(Protocol):
    """Who an audit entry names."""

    @property
    def subject(self) -> str:
        """Who, as recorded in the audit log (user:<id>, key:<id>, cli)."""
        ...

    @property
    def role(self) -> str:
        """Its role (platform_admin, tenant_admin, operator, viewer, device)."""
        ...


class Actor(Author, Protocol):
    """Whoever makes a change: an authenticated API caller, or the operator at the command line.

    `sensormine.identity.credentials.Identity` is one; use cases take any object with these members.
    """

    @property
    def is_platform(self) -> bool:
        """Whether it acts for the platform (may see and create top-level tenants)."""
        ...

    def scope(
        self, conn: psycopg.Connection, write: bool = False, also: Iterable[str] = ()
    ) -> AbstractContextManager[psycopg.Connection]:
        """A transaction under row-level security limited to its tenants (and `also`); the writer role if `write`."""
        ...


@dataclass(frozen=True)
class AuditEntry:
    """One recorded change."""

    id: int
    at: datetime
    tenant_id: str | None
    actor: str
    actor_role: str | None
    action: str
    target_type: str
    target_id: str
    detail: dict[str, Any]


def record(
    conn: psycopg.Connection,
    actor: Author,
    tenant_id: str | None,
    action: str,
    target_type: str,
    target_id: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Record a change; call inside the transaction that makes it, so both commit or neither."""
    conn.execute(
        "INSERT INTO audit_log (tenant_id, actor, actor_role, action, target_type, target_id, detail) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (tenant_id, actor.subject, str(actor.role), action, target_type, target_id, Jsonb(detail or {})),
    )


def query_audit(
    conn: psycopg.Connection,
    tenant_ids: list[str],
    *,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    before_id: int | None = None,
    limit: int = 100,
    include_platform: bool = False,
) -> list[AuditEntry]:
    """Entries of the given tenants (and platform-level ones, without a tenant, if asked), newest first."""
    rows = conn.execute(
        "SELECT id, at, tenant_id, actor, actor_role, action, target_type, target_id, detail FROM audit_log "
        "WHERE (tenant_id = ANY(%(t)s) OR (%(platform)s AND tenant_id IS NULL)) "
        "AND (%(action)s::text IS NULL OR action = %(action)s OR action LIKE %(prefix)s) "
        "AND (%(actor)s::text IS NULL OR actor = %(actor)s) AND (%(since)s::timestamptz IS NULL OR at >= %(since)s) "
        "AND (%(before)s::bigint IS NULL OR id < %(before)s) ORDER BY id DESC LIMIT %(limit)s",
        {
            "t": tenant_ids,
            "action": action,
            "prefix": f"{action}.%" if action else None,
            "actor": actor,
            "since": since,
            "before": before_id,
            "limit": limit,
            "platform": include_platform,
        },
    ).fetchall()
    return [AuditEntry(*r) for r in rows]
