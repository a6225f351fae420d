"""Identity use cases shared by the REST API and the `sensormine` command line: users and API keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from sensormine.audit import log as audit
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.credentials import Identity
from sensormine.identity.roles import ROLE_PERMISSIONS, AuthError, Role, expand_scopes, may_grant
from sensormine.identity.users import User, create_user, get_user, update_user

DEFAULT_KEY_SCOPES = ("read", "write")


class NotPermitted(AuthError):
    """What the actor may not do: grant or touch a role above its own, permissions it lacks, itself (403)."""


class UnknownUser(AuthError):
    """No such user the actor can see (404)."""


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

    Raises AuthError (platform_admin keys, scopes granting nothing or unknown), NotPermitted, and
    RegistryError (no such tenant).
    """
    if role == Role.PLATFORM_ADMIN:
        raise AuthError("API keys belong to a tenant: platform_admin is a role for users only")
    if not may_grant(actor.role, role):
        raise NotPermitted(f"a {actor.role} may not create a key for a {role} (never above its own role)")
    permissions = ROLE_PERMISSIONS[role] & expand_scopes(scopes)
    if not permissions:
        raise AuthError(f"the scopes {list(scopes)} grant a {role} nothing")
    excess = sorted(permissions - actor.permissions)
    if excess:
        raise NotPermitted(f"a key cannot hold permissions you lack: {', '.join(excess)}; narrow its scopes or role")
    with actor.scope(conn, write=True):
        secret = create_api_key(conn, tenant_id, name, tuple(scopes), role.value, actor.subject)
        key_id = secret.split("_", 2)[1]
        detail = {"name": name, "role": role.value, "scopes": list(scopes)}
        audit.record(conn, actor, tenant_id, "key.create", "api_key", key_id, detail)
    return IssuedKey(key_id, secret)


def _may_grant(actor: Identity, role: Role, what: str) -> None:
    if not may_grant(actor.role, role):
        raise NotPermitted(f"a {actor.role} may not {what} a {role} (never above its own role)")


def add_user(
    conn: psycopg.Connection,
    actor: Identity,
    tenant_id: str | None,
    email: str,
    password: str,
    role: Role,
    name: str = "",
) -> User:
    """Create a user with a role the actor may grant, audited. A platform administrator has no tenant.

    Raises NotPermitted, AuthError (bad email or password, taken email, tenant rules).
    """
    _may_grant(actor, role, "create")
    with actor.scope(conn, write=True):
        user = create_user(conn, tenant_id, email, password, role, name)
        detail = {"email": user.email, "name": user.name, "role": user.role.value, "tenant_id": tenant_id}
        audit.record(conn, actor, tenant_id, "user.create", "user", user.id, detail)
    return user


def change_user(
    conn: psycopg.Connection,
    actor: Identity,
    user_id: str,
    *,
    name: str | None = None,
    role: Role | None = None,
    password: str | None = None,
    disabled: bool | None = None,
) -> tuple[User, dict[str, Any]]:
    """Change a user the actor can see, audited; returns the user and what changed (empty: nothing).

    Anyone may change their own name and password; their own role and disabling themselves are
    refused; another user only when the actor outranks or equals their role (old and new).
    A role change, a new password or disabling ends the user's sessions. Raises UnknownUser,
    NotPermitted, AuthError.
    """
    myself = actor.subject == f"user:{user_id}"
    with actor.scope(conn, write=True):
        target = get_user(conn, user_id)
        if target is None:
            raise UnknownUser(f"user {user_id!r} not found")
        if myself:
            if role is not None and role != target.role:
                raise NotPermitted("you cannot change your own role; ask another administrator")
            if disabled:
                raise NotPermitted("you cannot disable yourself; ask another administrator")
        else:
            _may_grant(actor, target.role, "change" if not disabled else "disable")
            if role is not None:
                _may_grant(actor, role, "make someone")
        user = update_user(
            conn,
            user_id,
            name=name,
            role=role if role != target.role else None,
            password=password,
            disabled=disabled,
        )
        assert user is not None
        changed: dict[str, Any] = {}
        if user.name != target.name:
            changed["name"] = user.name
        if user.role != target.role:
            changed["role"] = {"from": target.role.value, "to": user.role.value}
        if user.disabled != target.disabled:
            changed["disabled"] = user.disabled
        if password is not None:
            changed["password_changed"] = True
        if changed:
            action = "user.disable" if changed.get("disabled") is True else "user.update"
            audit.record(conn, actor, user.tenant_id, action, "user", user.id, changed)
    return user, changed
