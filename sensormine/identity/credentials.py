"""Resolving a bearer token or an API key to the identity making a request."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import psycopg

from sensormine.clients.postgres import AUTH, role_scope, tenant_scope
from sensormine.identity.roles import ROLE_PERMISSIONS, AuthError, Role, expand_scopes
from sensormine.identity.secrets import hash_secret
from sensormine.identity.tokens import decode_token
from sensormine.settings import Settings
from sensormine.tenancy.tenants import visible_tenant_ids


@dataclass(frozen=True)
class Identity:
    """Who a credential is and what it may do."""

    subject: str  # user:<id> or key:<id>
    tenant_id: str | None  # None: a platform administrator
    role: Role
    permissions: frozenset[str]
    visible: tuple[str, ...]  # tenants it may read: its own and its sub-tenants (every tenant for the platform)
    plan: str | None  # the effective plan of its tenant
    quota_tenant: str | None  # whose plan and quota apply (nearest ancestor-or-self with a plan)

    def can(self, permission: str) -> bool:
        """Whether the identity holds a permission."""
        return permission in self.permissions

    @property
    def is_platform(self) -> bool:
        """A platform administrator (or the operator at the command line)."""
        return self.role == Role.PLATFORM_ADMIN

    def scope(
        self, conn: psycopg.Connection, write: bool = False, also: Iterable[str] = ()
    ) -> AbstractContextManager[psycopg.Connection]:
        """A transaction under row-level security limited to the identity's tenants (and `also`, e.g. one being
        created); as the writer role when `write`."""
        return tenant_scope(conn, (*self.visible, *also), write=write, platform=self.is_platform)


def _identity(
    conn: psycopg.Connection, subject: str, tenant_id: str | None, role: Role, permissions: frozenset[str]
) -> Identity:
    if tenant_id is None:
        visible = [r[0] for r in conn.execute("SELECT id FROM tenants ORDER BY id").fetchall()]
        return Identity(subject, None, role, permissions, tuple(visible), None, None)
    visible = visible_tenant_ids(conn, tenant_id)
    row = conn.execute(
        "SELECT sensormine_effective_plan(%(t)s), sensormine_quota_tenant(%(t)s)", {"t": tenant_id}
    ).fetchone()
    assert row is not None
    return Identity(subject, tenant_id, role, permissions, tuple(visible), row[0], row[1])


OPERATOR_SUBJECT = "cli"


def operator_identity(conn: psycopg.Connection, subject: str = OPERATOR_SUBJECT) -> Identity:
    """The operator at the `sensormine` command line on a server: a platform administrator over every tenant.

    Audit entries name it `cli`. What it may do beyond an API caller (e.g. exceed a device quota) is an
    explicit option of the command, recorded in the audit entry.
    """
    permissions = ROLE_PERMISSIONS[Role.PLATFORM_ADMIN]
    with role_scope(conn, AUTH):
        return _identity(conn, subject, None, Role.PLATFORM_ADMIN, permissions)


def identity_from_token(conn: psycopg.Connection, settings: Settings, token: str) -> Identity:
    """The identity of a valid access token's user."""
    claims = decode_token(settings, token, "access")
    with role_scope(conn, AUTH):
        row = conn.execute(
            "SELECT tenant_id, role, disabled_at IS NOT NULL, token_version FROM users WHERE id = %s", (claims["sub"],)
        ).fetchone()
        if row is None or row[2]:
            raise AuthError("the user no longer exists or is disabled")
        if row[3] != claims.get("ver"):
            raise AuthError("the session was ended (logout, password or role change); log in again")
        role = Role(row[1])
        return _identity(conn, f"user:{claims['sub']}", row[0], role, ROLE_PERMISSIONS[role])


def identity_from_api_key(conn: psycopg.Connection, key: str) -> Identity:
    """The identity of a valid, unrevoked API key."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "smk":
        raise AuthError("the API key is malformed (keys look like smk_<id>_<secret>)")
    with role_scope(conn, AUTH):
        row = conn.execute(
            "SELECT tenant_id, role, scopes, key_hash FROM api_keys WHERE id = %s AND revoked_at IS NULL", (parts[1],)
        ).fetchone()
        if row is None or not secrets.compare_digest(row[3], hash_secret(key)):
            raise AuthError("the API key is unknown or revoked")
        role = Role(row[1])
        return _identity(conn, f"key:{parts[1]}", row[0], role, ROLE_PERMISSIONS[role] & expand_scopes(row[2]))
