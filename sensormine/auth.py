"""Identity and access: roles and their permissions, users with passwords, JWTs, and who a credential is.

Users log in (OAuth2 password flow) and get an access and a refresh JWT; services and devices use API
keys (`registry.create_api_key`). Either credential resolves to an `Identity`: the tenant it belongs to,
the tenants it may read (its own and every sub-tenant; every tenant for a platform administrator),
its role and the permissions that role grants (narrowed by an API key's scopes).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
import psycopg

from sensormine.registry import hash_secret, visible_tenant_ids
from sensormine.settings import Settings


class AuthError(ValueError):
    """A credential that does not authenticate (unknown, expired, revoked, disabled)."""


class Role(enum.StrEnum):
    """What a user or API key may do; each role includes the one below it (device stands apart)."""

    PLATFORM_ADMIN = "platform_admin"
    TENANT_ADMIN = "tenant_admin"
    OPERATOR = "operator"
    VIEWER = "viewer"
    DEVICE = "device"


VIEWER_PERMISSIONS = frozenset(
    {"tenants:read", "devices:read", "schemas:read", "telemetry:read", "dlq:read", "usage:read"}
)
OPERATOR_PERMISSIONS = VIEWER_PERMISSIONS | {"devices:write", "schemas:write", "telemetry:write", "dlq:write"}
TENANT_ADMIN_PERMISSIONS = OPERATOR_PERMISSIONS | {
    "tenants:write",
    "users:read",
    "users:write",
    "keys:read",
    "keys:write",
    "audit:read",
}
# Only platform administrators create top-level tenants and change plans and feature flags of their own tenant.
PLATFORM_PERMISSIONS = TENANT_ADMIN_PERMISSIONS | {"platform:admin", "tenants:plan"}

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.PLATFORM_ADMIN: frozenset(PLATFORM_PERMISSIONS),
    Role.TENANT_ADMIN: frozenset(TENANT_ADMIN_PERMISSIONS),
    Role.OPERATOR: frozenset(OPERATOR_PERMISSIONS),
    Role.VIEWER: VIEWER_PERMISSIONS,
    Role.DEVICE: frozenset({"telemetry:write"}),
}
ALL_PERMISSIONS = frozenset().union(*ROLE_PERMISSIONS.values())
# Rank for "may grant": a user or key may create users and keys only of a role it outranks or equals.
ROLE_RANK = {Role.PLATFORM_ADMIN: 4, Role.TENANT_ADMIN: 3, Role.OPERATOR: 2, Role.VIEWER: 1, Role.DEVICE: 0}


def expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Permissions named by API key scopes: 'read' and 'write' stand for every read and write permission."""
    out: set[str] = set()
    for s in scopes:
        if s in ("read", "write"):
            out |= {p for p in ALL_PERMISSIONS if p.endswith(":" + s)}
        elif s in ALL_PERMISSIONS:
            out.add(s)
        else:
            raise AuthError(f"unknown scope {s!r}; scopes are 'read', 'write' or permissions like 'devices:read'")
    return frozenset(out)


def may_grant(granter: Role, role: Role) -> bool:
    """Whether `granter` may create a user or key of `role` (never above itself; devices by operators up)."""
    return ROLE_RANK[granter] >= ROLE_RANK[role] and (role != Role.PLATFORM_ADMIN or granter == Role.PLATFORM_ADMIN)


# --- passwords: scrypt from the standard library, parameters stored with the hash -------------------------

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_LENGTH = 10


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash` of a password."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` matches a `hash_password` result (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest)
        got = hashlib.scrypt(
            password.encode(), salt=base64.urlsafe_b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def check_password_rules(password: str) -> None:
    """Reject passwords too weak to store."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")


# --- users -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """A person who logs in."""

    id: str
    tenant_id: str | None
    email: str
    name: str
    role: Role
    disabled: bool


_USER_COLS = "id, tenant_id, email, name, role, disabled_at IS NOT NULL"


def _user(row: tuple) -> User:
    return User(row[0], row[1], row[2], row[3], Role(row[4]), row[5])


def create_user(
    conn: psycopg.Connection, tenant_id: str | None, email: str, password: str, role: Role | str, name: str = ""
) -> User:
    """Create a user (a platform administrator has no tenant; everyone else has one)."""
    role = Role(role)
    check_password_rules(password)
    if (role == Role.PLATFORM_ADMIN) != (tenant_id is None):
        raise AuthError("platform administrators belong to no tenant; every other user belongs to one")
    user_id = uuid.uuid4().hex
    try:
        with conn.transaction():
            row = conn.execute(
                f"INSERT INTO users (id, tenant_id, email, name, role, password_hash) VALUES (%s, %s, %s, %s, %s, %s) "
                f"RETURNING {_USER_COLS}",
                (user_id, tenant_id, email.strip(), name or email.split("@")[0], role.value, hash_password(password)),
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise AuthError(f"a user with email {email!r} already exists") from None
    except psycopg.errors.ForeignKeyViolation:
        raise AuthError(f"tenant {tenant_id!r} does not exist") from None
    except psycopg.errors.CheckViolation:
        raise AuthError(f"{email!r} is not an email address") from None
    assert row is not None
    return _user(row)


def get_user(conn: psycopg.Connection, user_id: str) -> User | None:
    """One user by id, or None."""
    row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE id = %s", (user_id,)).fetchone()
    return _user(row) if row else None


def list_users(conn: psycopg.Connection, tenant_ids: list[str], after: str | None, limit: int) -> list[User]:
    """Users of the given tenants by id, after a cursor id."""
    rows = conn.execute(
        f"SELECT {_USER_COLS} FROM users WHERE tenant_id = ANY(%s) AND (%s::text IS NULL OR id > %s) "
        "ORDER BY id LIMIT %s",
        (tenant_ids, after, after, limit),
    ).fetchall()
    return [_user(r) for r in rows]


def update_user(
    conn: psycopg.Connection,
    user_id: str,
    *,
    name: str | None = None,
    role: Role | None = None,
    password: str | None = None,
    disabled: bool | None = None,
) -> User | None:
    """Change a user; a new password, role or disabling ends every token issued before."""
    sets: list[str] = []
    params: list[object] = []
    if name is not None:
        sets.append("name = %s")
        params.append(name)
    if role is not None:
        sets.append("role = %s")
        params.append(Role(role).value)
    if password is not None:
        check_password_rules(password)
        sets.append("password_hash = %s")
        params.append(hash_password(password))
    if disabled is not None:
        sets.append("disabled_at = CASE WHEN %s THEN coalesce(disabled_at, now()) END")
        params.append(disabled)
    if role is not None or password is not None or disabled:
        sets.append("token_version = token_version + 1")
    if not sets:
        return get_user(conn, user_id)
    try:
        with conn.transaction():
            row = conn.execute(
                f"UPDATE users SET {', '.join(sets)} WHERE id = %s RETURNING {_USER_COLS}", (*params, user_id)
            ).fetchone()
    except psycopg.errors.CheckViolation:
        raise AuthError("platform_admin is a role for users without a tenant only") from None
    return _user(row) if row else None


def end_sessions(conn: psycopg.Connection, user_id: str) -> None:
    """Log a user out everywhere: every token issued so far stops working."""
    with conn.transaction():
        conn.execute("UPDATE users SET token_version = token_version + 1 WHERE id = %s", (user_id,))


def authenticate_password(conn: psycopg.Connection, email: str, password: str) -> User:
    """The user with this email and password; AuthError (one message for every failure) otherwise."""
    row = conn.execute(
        f"SELECT {_USER_COLS}, password_hash FROM users WHERE lower(email) = lower(%s)", (email.strip(),)
    ).fetchone()
    # Hash even for an unknown email, so timing does not tell which emails exist.
    ok = verify_password(password, row[6] if row else _DUMMY_HASH)
    if row is None or not ok or row[5]:
        raise AuthError("incorrect email or password, or the user is disabled")
    return _user(row[:6])


_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


# --- tokens ----------------------------------------------------------------------------------------------

DEV_JWT_SECRET = "sensormine-development-secret-not-for-production"
DEVELOPMENT_ENVS = frozenset({"dev", "test", "demo", "local"})
JWT_ALGORITHM = "HS256"


def jwt_secret(settings: Settings) -> str:
    """The signing secret; outside development a real one (32+ characters) must be configured."""
    secret = settings.jwt_secret
    if secret and secret != DEV_JWT_SECRET:
        if len(secret) < 32 and settings.env not in DEVELOPMENT_ENVS:
            raise AuthError("SENSORMINE_JWT_SECRET must be at least 32 characters outside development")
        return secret
    if settings.env in DEVELOPMENT_ENVS:
        return DEV_JWT_SECRET
    raise AuthError(
        f"SENSORMINE_JWT_SECRET is unset (or the development default) while SENSORMINE_ENV={settings.env!r} is not "
        f"one of {', '.join(sorted(DEVELOPMENT_ENVS))}; set it to a random string, e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
    )


@dataclass(frozen=True)
class TokenPair:
    """What a login or refresh returns."""

    access_token: str
    refresh_token: str
    expires_in: int


def _token_version(conn: psycopg.Connection, user_id: str) -> int:
    row = conn.execute("SELECT token_version FROM users WHERE id = %s", (user_id,)).fetchone()
    if row is None:
        raise AuthError("the user no longer exists")
    return int(row[0])


def issue_tokens(conn: psycopg.Connection, settings: Settings, user: User) -> TokenPair:
    """A new access and refresh token for a user."""
    secret = jwt_secret(settings)
    now = int(time.time())
    base = {"sub": user.id, "ver": _token_version(conn, user.id), "iat": now}
    access = {**base, "typ": "access", "exp": now + settings.jwt_access_ttl_s, "jti": secrets.token_hex(8)}
    refresh = {**base, "typ": "refresh", "exp": now + settings.jwt_refresh_ttl_s, "jti": secrets.token_hex(8)}
    return TokenPair(
        jwt.encode(access, secret, algorithm=JWT_ALGORITHM),
        jwt.encode(refresh, secret, algorithm=JWT_ALGORITHM),
        settings.jwt_access_ttl_s,
    )


def decode_token(settings: Settings, token: str, typ: str) -> dict:
    """The claims of a valid, unexpired token of type `typ` (access or refresh)."""
    try:
        claims = jwt.decode(
            token, jwt_secret(settings), algorithms=[JWT_ALGORITHM], options={"require": ["exp", "sub", "typ"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(f"the {typ} token has expired; log in again or refresh it") from None
    except jwt.InvalidTokenError:
        raise AuthError(f"the {typ} token is invalid") from None
    if claims.get("typ") != typ:
        raise AuthError(f"a {claims.get('typ')} token was sent where a {typ} token is needed")
    return claims


def refresh_tokens(conn: psycopg.Connection, settings: Settings, refresh_token: str) -> TokenPair:
    """New tokens for a valid refresh token of an enabled user whose sessions were not ended since."""
    claims = decode_token(settings, refresh_token, "refresh")
    user = get_user(conn, claims["sub"])
    if user is None or user.disabled:
        raise AuthError("the user no longer exists or is disabled")
    if _token_version(conn, user.id) != claims.get("ver"):
        raise AuthError("the session was ended (logout, password or role change); log in again")
    return issue_tokens(conn, settings, user)


# --- identities ------------------------------------------------------------------------------------------


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


def identity_from_token(conn: psycopg.Connection, settings: Settings, token: str) -> Identity:
    """The identity of a valid access token's user."""
    claims = decode_token(settings, token, "access")
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
    row = conn.execute(
        "SELECT tenant_id, role, scopes, key_hash FROM api_keys WHERE id = %s AND revoked_at IS NULL", (parts[1],)
    ).fetchone()
    if row is None or not secrets.compare_digest(row[3], hash_secret(key)):
        raise AuthError("the API key is unknown or revoked")
    role = Role(row[1])
    return _identity(conn, f"key:{parts[1]}", row[0], role, ROLE_PERMISSIONS[role] & expand_scopes(row[2]))
