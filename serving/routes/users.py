"""Users and API keys of a tenant and its subtree.

Tenant administrators manage the users and keys of their tenant and its sub-tenants; `may_grant` decides
which roles they may hand out (never above their own, platform_admin only by platform administrators).
An API key never carries a permission its creator lacks. Everyone may change their own name and password.
Passwords and key secrets are never returned (a key's secret once, when it is made) nor audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from sensormine.audit.log import record
from sensormine.identity.api_keys import ApiKeyRecord, get_api_key, page_api_keys, revoke_api_key
from sensormine.identity.roles import ROLE_PERMISSIONS, Role, expand_scopes, may_grant
from sensormine.identity.usecases import NotPermitted, UnknownUser, add_user, change_user, issue_api_key
from sensormine.identity.users import (
    MIN_PASSWORD_LENGTH,
    AuthError,
    User,
    get_user,
    list_users,
)
from sensormine.tenancy.tenants import RegistryError
from serving.deps import Caller, CallerDep, ConnDep, authenticate, credential_cache
from serving.pagination import Page, PageDep
from serving.problems import Problem

router = APIRouter(prefix="/api", tags=["users"])

UserReader = Annotated[Caller, Security(authenticate, scopes=["users:read"])]
UserWriter = Annotated[Caller, Security(authenticate, scopes=["users:write"])]
KeyReader = Annotated[Caller, Security(authenticate, scopes=["keys:read"])]
KeyWriter = Annotated[Caller, Security(authenticate, scopes=["keys:write"])]
TenantParam = Annotated[str | None, Query(description="Only this tenant (one of yours or a sub-tenant)")]

EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+$"


# --- bodies --------------------------------------------------------------------------------------------------


class UserCreate(BaseModel):
    """A new user; in your own tenant unless `tenant_id` names a sub-tenant (platform administrators name one)."""

    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=254, pattern=EMAIL_PATTERN)
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=1024, repr=False)
    role: Role = Role.VIEWER
    name: str = Field("", max_length=200)
    tenant_id: str | None = Field(None, description="Omitted for platform administrators (who have no tenant)")


class UserPatch(BaseModel):
    """Changes to a user; a new role, password or disabling ends the user's sessions."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    role: Role | None = None
    password: str | None = Field(None, min_length=MIN_PASSWORD_LENGTH, max_length=1024, repr=False)
    disabled: bool | None = None


class UserOut(BaseModel):
    """A user (never the password)."""

    id: str
    tenant_id: str | None
    email: str
    name: str
    role: Role
    disabled: bool


class KeyCreate(BaseModel):
    """A new API key: it acts with `role`, narrowed by `scopes` ('read', 'write' or permissions)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("default", min_length=1, max_length=200)
    role: Role = Role.OPERATOR
    scopes: list[str] = Field(default_factory=lambda: ["read", "write"], min_length=1, max_length=50)
    tenant_id: str | None = Field(None, description="Your own tenant when omitted; platform administrators name one")


class KeyOut(BaseModel):
    """An API key (never its secret or hash)."""

    id: str
    tenant_id: str
    name: str
    role: str
    scopes: list[str]
    permissions: list[str]
    created_by: str | None
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    """A new API key with its secret: shown this once, stored only hashed."""

    key: str = Field(description="Send as the X-API-Key header; it cannot be shown again")


# --- helpers -------------------------------------------------------------------------------------------------


def _out(user: User) -> UserOut:
    return UserOut(**vars(user))


def _user_id(caller: Caller) -> str | None:
    kind, _, ident = caller.subject.partition(":")
    return ident if kind == "user" else None


def _visible_user(conn: psycopg.Connection, caller: Caller, user_id: str) -> User:
    """A user the caller may see (row-level security hides the rest), else 404; inside a scope."""
    user = get_user(conn, user_id)
    if user is None:
        raise Problem(404, f"user {user_id!r} not found")
    return user


def _auth_problem(exc: AuthError) -> Problem:
    return Problem(409 if "already exists" in str(exc) else 422, str(exc))


def _refuse(caller: Caller, role: Role, what: str) -> None:
    if not may_grant(caller.role, role):
        raise Problem(403, f"a {caller.role} may not {what} a {role} (never above its own role)")


# --- users ---------------------------------------------------------------------------------------------------


@router.post("/users", response_model=UserOut, status_code=201)
def create(body: UserCreate, caller: UserWriter, conn: ConnDep, response: Response) -> UserOut:
    """Create a user of your tenant or a sub-tenant, with a role you may grant."""
    if body.role == Role.PLATFORM_ADMIN:
        if body.tenant_id is not None:
            raise Problem(422, "platform administrators belong to no tenant: leave tenant_id out")
        tenant_id = None
    else:
        tenant_id = caller.tenant(body.tenant_id)
    try:
        user = add_user(conn, caller, tenant_id, body.email, body.password, body.role, body.name)
    except NotPermitted as exc:
        raise Problem(403, str(exc)) from None
    except AuthError as exc:
        raise _auth_problem(exc) from None
    response.headers["Location"] = f"/api/users/{user.id}"
    return _out(user)


@router.get("/users", response_model=Page[UserOut])
def list_all(caller: UserReader, conn: ConnDep, page: PageDep, tenant_id: TenantParam = None) -> dict[str, Any]:
    """Users of your tenant and its sub-tenants (or of one of them), by id."""
    tenants = [caller.tenant(tenant_id)] if tenant_id else list(caller.visible)
    with caller.scope(conn):
        users = list_users(conn, tenants, page.after, page.limit + 1)
    return page.page([_out(u) for u in users], key=lambda u: u.id)


@router.get("/users/{user_id}", response_model=UserOut)
def read(user_id: str, caller: CallerDep, conn: ConnDep) -> UserOut:
    """One user (yourself with any role; others with users:read)."""
    if user_id != _user_id(caller) and not caller.can("users:read"):
        raise Problem(403, f"this {caller.subject.split(':')[0]} (role {caller.role}) lacks the permission users:read")
    with caller.scope(conn):
        return _out(_visible_user(conn, caller, user_id))


@router.patch("/users/{user_id}", response_model=UserOut)
def update(user_id: str, body: UserPatch, caller: CallerDep, conn: ConnDep, request: Request) -> UserOut:
    """Change a user: your own name and password with any role; anything of a user you outrank with users:write."""
    if user_id != _user_id(caller) and not caller.can("users:write"):
        raise Problem(403, f"this {caller.subject.split(':')[0]} (role {caller.role}) lacks the permission users:write")
    user, changed = _change(
        conn, caller, user_id, name=body.name, role=body.role, password=body.password, disabled=body.disabled
    )
    if {"role", "disabled", "password_changed"} & set(changed):
        credential_cache(request).clear()
    return _out(user)


@router.delete("/users/{user_id}", status_code=204)
def disable(user_id: str, caller: UserWriter, conn: ConnDep, request: Request) -> None:
    """Disable a user: their tokens stop working at once and they cannot log in (PATCH disabled=false undoes it)."""
    _change(conn, caller, user_id, disabled=True)
    credential_cache(request).clear()


def _change(conn: psycopg.Connection, caller: Caller, user_id: str, **changes: Any) -> tuple[User, dict[str, Any]]:
    try:
        return change_user(conn, caller, user_id, **changes)
    except UnknownUser as exc:
        raise Problem(404, str(exc)) from None
    except NotPermitted as exc:
        status = 422 if "yourself" in str(exc) else 403
        raise Problem(status, str(exc)) from None
    except AuthError as exc:
        raise _auth_problem(exc) from None


# --- API keys ------------------------------------------------------------------------------------------------


def _key(record: ApiKeyRecord) -> KeyOut:
    try:
        permissions = sorted(ROLE_PERMISSIONS[Role(record.role)] & expand_scopes(record.scopes))
    except AuthError:
        permissions = []
    return KeyOut(**{**vars(record), "scopes": list(record.scopes)}, permissions=permissions)


def _fetch_key(conn: psycopg.Connection, key_id: str) -> KeyOut:
    record = get_api_key(conn, key_id)
    if record is None:
        raise Problem(404, f"API key {key_id!r} not found")
    return _key(record)


@router.post("/keys", response_model=KeyCreated, status_code=201)
def create_key(body: KeyCreate, caller: KeyWriter, conn: ConnDep, response: Response) -> KeyCreated:
    """Issue an API key; its secret is in this response only. It never holds a permission you lack."""
    tenant_id = caller.tenant(body.tenant_id)
    try:
        issued = issue_api_key(conn, caller, tenant_id, body.name, body.role, body.scopes)
    except NotPermitted as exc:
        raise Problem(403, str(exc)) from None
    except (AuthError, RegistryError) as exc:
        raise Problem(422, str(exc)) from None
    with caller.scope(conn):
        out = _fetch_key(conn, issued.key_id)
    response.headers["Location"] = f"/api/keys/{issued.key_id}"
    return KeyCreated(**out.model_dump(), key=issued.secret)


@router.get("/keys", response_model=Page[KeyOut])
def list_keys(
    caller: KeyReader,
    conn: ConnDep,
    page: PageDep,
    tenant_id: TenantParam = None,
    include_revoked: Annotated[bool, Query(description="Also list revoked keys")] = False,
) -> dict[str, Any]:
    """API keys of your tenant and its sub-tenants (or of one of them), by id; never their secrets."""
    tenants = [caller.tenant(tenant_id)] if tenant_id else list(caller.visible)
    with caller.scope(conn):
        records = page_api_keys(conn, tenants, page.after, page.limit + 1, include_revoked)
    return page.page([_key(r) for r in records], key=lambda k: k.id)


@router.get("/keys/{key_id}", response_model=KeyOut)
def read_key(key_id: str, caller: KeyReader, conn: ConnDep) -> KeyOut:
    """One API key (never its secret)."""
    with caller.scope(conn):
        return _fetch_key(conn, key_id)


@router.delete("/keys/{key_id}", status_code=204)
def revoke_key(key_id: str, caller: KeyWriter, conn: ConnDep, request: Request) -> None:
    """Revoke an API key: it is refused from the next request on (in this API process; others within the
    credential cache time)."""
    with caller.scope(conn, write=True):
        key = _fetch_key(conn, key_id)
        _refuse(caller, Role(key.role), "revoke a key of")
        if key.revoked_at is None and revoke_api_key(conn, key_id):
            record(conn, caller, key.tenant_id, "key.revoke", "api_key", key_id, {"name": key.name})
    credential_cache(request).clear()
