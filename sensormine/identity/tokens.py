"""Access and refresh tokens (HS256 JWT) and the signing secret."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import jwt
import psycopg

from sensormine.identity.roles import AuthError
from sensormine.identity.users import User, get_user
from sensormine.settings import DEVELOPMENT_ENVS, Settings

DEV_JWT_SECRET = "sensormine-development-secret-not-for-production"
"""The fixed secret of earlier versions: refused everywhere now (tokens signed with it would be forgeable)."""
JWT_ALGORITHM = "HS256"
SECRET_FILE = "jwt-secret"


def jwt_secret(settings: Settings) -> str:
    """The signing secret: SENSORMINE_JWT_SECRET (32+ characters outside development), else, in a development
    environment only, a random one generated once into the state directory (shared by its processes)."""
    secret = settings.jwt_secret
    if secret and secret != DEV_JWT_SECRET:
        if len(secret) < 32 and settings.env not in DEVELOPMENT_ENVS:
            raise AuthError("SENSORMINE_JWT_SECRET must be at least 32 characters outside development")
        return secret
    if settings.env in DEVELOPMENT_ENVS:
        return settings.generated_secret(SECRET_FILE, what="signing tokens", variable="SENSORMINE_JWT_SECRET")
    raise AuthError(
        f"SENSORMINE_JWT_SECRET is unset (or the old development default) while SENSORMINE_ENV={settings.env!r} is "
        f"not one of {', '.join(sorted(DEVELOPMENT_ENVS))}; set it to a random string, e.g. "
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
