"""Identity use cases shared by the REST API and the `sensormine` command line: issuing API keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from sensormine.audit import log as audit
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.credentials import Identity
from sensormine.identity.roles import ROLE_PERMISSIONS, AuthError, Role, expand_scopes, may_grant

DEFAULT_KEY_SCOPES = ("read", "write")


class KeyRefused(AuthError):
    """A key the actor may not issue: a role above its own, or permissions it lacks (403)."""


@dataclass(frozen=True)
class IssuedKey:
    """A new API key: its id, and its secret (`smk_<id>_<secret>`, shown once)."""

    key_id: str
    secret: str


def issue_api_key(
    conn: psycopg.Connection,
    actor: Identity,
    tenant_id: str,
    name: str = "default",
    role: Role = Role.OPERATOR,
    scopes: Sequence[str] = DEFAULT_KEY_SCOPES,
) -> IssuedKey:
    """Issue an API key of a tenant, audited: never above the actor's role, never a permission it lacks.

    Raises AuthError (platform_admin keys, scopes granting nothing or unknown), KeyRefused, and
    RegistryError (no such tenant).
    """
    if role == Role.PLATFORM_ADMIN:
        raise AuthError("API keys belong to a tenant: platform_admin is a role for users only")
    if not may_grant(actor.role, role):
        raise KeyRefused(f"a {actor.role} may not create a key for a {role} (never above its own role)")
    permissions = ROLE_PERMISSIONS[role] & expand_scopes(scopes)
    if not permissions:
        raise AuthError(f"the scopes {list(scopes)} grant a {role} nothing")
    excess = sorted(permissions - actor.permissions)
    if excess:
        raise KeyRefused(f"a key cannot hold permissions you lack: {', '.join(excess)}; narrow its scopes or role")
    with actor.scope(conn, write=True):
        secret = create_api_key(conn, tenant_id, name, tuple(scopes), role.value, actor.subject)
        key_id = secret.split("_", 2)[1]
        detail = {"name": name, "role": role.value, "scopes": list(scopes)}
        audit.record(conn, actor, tenant_id, "key.create", "api_key", key_id, detail)
    return IssuedKey(key_id, secret)
