"""Users: scrypt passwords, creation, changes that end sessions, password login."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

import psycopg

from sensormine.identity.roles import AuthError, Role

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


def user_by_email(conn: psycopg.Connection, email: str) -> User | None:
    """The user logging in with `email` (case-insensitive), or None."""
    row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE lower(email) = lower(%s)", (email,)).fetchone()
    return _user(row) if row else None


def every_user(conn: psycopg.Connection, tenant_id: str | None = None, *, platform_only: bool = False) -> list[User]:
    """Users (of one tenant when given; only platform administrators with `platform_only`), by tenant and email."""
    rows = conn.execute(
        f"SELECT {_USER_COLS} FROM users WHERE (%(t)s::text IS NULL OR tenant_id = %(t)s) "
        "AND (NOT %(p)s OR tenant_id IS NULL) ORDER BY tenant_id NULLS FIRST, lower(email)",
        {"t": tenant_id, "p": platform_only},
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
