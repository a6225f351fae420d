"""Dependency shorthands: settings, database connections, and the authenticated caller.

Every route declares the permissions it needs with FastAPI's `Security`, e.g.
`caller: Annotated[Caller, Security(authenticate, scopes=["devices:write"])]`; the OpenAPI document
shows them, and a caller without one gets a 403 problem naming it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request, Response
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from sensormine.identity.credentials import Identity, identity_from_api_key, identity_from_token
from sensormine.identity.roles import ALL_PERMISSIONS
from sensormine.identity.users import AuthError
from sensormine.settings import Settings
from serving.problems import Problem


async def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_conn(request: Request) -> Iterator[psycopg.Connection]:
    """A pooled connection for the request."""
    pool: ConnectionPool = request.app.state.pool
    with pool.connection() as conn:
        yield conn


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ConnDep = Annotated[psycopg.Connection, Depends(get_conn)]

PERMISSION_HELP = {p: p for p in sorted(ALL_PERMISSIONS)}
API_KEY_SCHEME = "APIKeyHeader"


class Credentials(OAuth2PasswordBearer):
    """The request's credential: a bearer token, else an API key in the X-API-Key header.

    One security dependency for both (each dependency costs every request its share of FastAPI's
    solving); OpenAPI documents it as the OAuth2 password flow with the permissions as scopes, and
    `document_api_keys` adds the API key header as the alternative.
    """

    async def __call__(self, request: HTTPConnection) -> tuple[str, str] | None:  # type: ignore[override]
        authorization = request.headers.get("authorization")
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token:
                return "bearer", token.strip()
        key = request.headers.get("x-api-key")
        return ("key", key) if key else None


credentials_scheme = Credentials(tokenUrl="/api/auth/token", scopes=PERMISSION_HELP, auto_error=False)


def document_api_keys(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the API key header to an OpenAPI document as the alternative to every OAuth2 requirement."""
    components = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    components[API_KEY_SCHEME] = {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (smk_<id>_<secret>); its role and scopes give its permissions",
    }
    for methods in schema.get("paths", {}).values():
        for op in methods.values():
            security = op.get("security")
            if security and {API_KEY_SCHEME: []} not in security:
                security.append({API_KEY_SCHEME: []})
    return schema


@dataclass(frozen=True)
class Caller(Identity):
    """The authenticated caller of a request."""

    def tenant(self, tenant_id: str | None = None) -> str:
        """The tenant a request addresses: `tenant_id` when given, else the caller's own.

        A tenant the caller may not read is answered as not found, so its existence is not disclosed.
        """
        if tenant_id is None:
            if self.tenant_id is None:
                raise Problem(422, "platform administrators name the tenant: add tenant_id")
            return self.tenant_id
        if tenant_id not in self.visible:
            raise Problem(404, f"tenant {tenant_id!r} not found")
        return tenant_id


class CredentialCache:
    """Resolved credentials for `auth_cache_ttl_s`, so a hot route costs no database round trip for auth."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Caller]] = {}

    @staticmethod
    def _key(kind: str, credential: str) -> str:
        return kind + hashlib.sha256(credential.encode()).hexdigest()

    def get(self, kind: str, credential: str) -> Caller | None:
        """A cached caller, or None when absent or expired."""
        hit = self._entries.get(self._key(kind, credential))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, kind: str, credential: str, caller: Caller) -> None:
        """Remember a resolved caller."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[self._key(kind, credential)] = (time.monotonic() + self.ttl_s, caller)

    def clear(self) -> None:
        """Forget everything (after a revocation, logout, role or tenant change in this process)."""
        with self._lock:
            self._entries.clear()


def credential_cache(request: Request) -> CredentialCache:
    """The app's credential cache."""
    return request.app.state.credentials


def _resolve(pool: ConnectionPool, settings: Settings, kind: str, credential: str) -> Caller:
    with pool.connection() as conn:
        ident = (
            identity_from_token(conn, settings, credential)
            if kind == "bearer"
            else identity_from_api_key(conn, credential)
        )
    return Caller(**vars(ident))


async def authenticate(
    security_scopes: SecurityScopes,
    request: Request,
    response: Response,
    credential: Annotated[tuple[str, str] | None, Depends(credentials_scheme)],
) -> Caller:
    """The caller, from a bearer access token or an API key; 401 without either, 403 without a permission.

    Async, so a request whose credential is cached costs no hop to the thread pool; only a cache
    miss (one database round trip) and the rate limiter run there.
    """
    settings: Settings = request.app.state.settings
    if credential is None:
        raise Problem(
            401,
            "log in (POST /api/auth/token) and send 'Authorization: Bearer <token>', "
            f"or send an API key in the {settings.api_key_header} header",
            headers={"WWW-Authenticate": "Bearer"},
        )
    kind, secret = credential
    cache = credential_cache(request)
    caller = cache.get(kind, secret)
    if caller is None:
        try:
            caller = await run_in_threadpool(_resolve, request.app.state.pool, settings, kind, secret)
        except AuthError as exc:
            raise Problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
        cache.put(kind, secret, caller)
    missing = [s for s in security_scopes.scopes if s not in caller.permissions]
    if missing:
        raise Problem(
            403,
            f"this {caller.subject.split(':')[0]} (role {caller.role}) lacks the permission {', '.join(missing)}",
        )
    if not getattr(request.state, "caller", None):
        request.state.caller = caller
        limits = getattr(request.app.state, "enforce_call_limits", None)
        if limits is not None:
            await limits(request, response, caller)
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]  # any authenticated caller, no particular permission
