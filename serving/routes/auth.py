"""Log in (OAuth2 password flow), refresh, log out, and who am I."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel, Field

from sensormine.clients.postgres import AUTH, role_scope
from sensormine.identity.tokens import issue_tokens, refresh_tokens
from sensormine.identity.users import AuthError, authenticate_password, end_sessions
from sensormine.tenancy.config import effective_config
from serving.deps import CallerDep, ConnDep, SettingsDep, credential_cache
from serving.problems import Problem

router = APIRouter(prefix="/api/auth", tags=["auth"])


class TokenOut(BaseModel):
    """An OAuth2 token response with a refresh token."""

    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds until the access token expires")


class RefreshIn(BaseModel):
    """A refresh token to exchange."""

    refresh_token: str = Field(min_length=1)


class MeOut(BaseModel):
    """The caller: identity, role, permissions and what applies to its tenant."""

    subject: str
    tenant_id: str | None
    role: str
    permissions: list[str]
    visible_tenants: list[str]
    plan: str | None
    features: dict[str, Any]


def _tokens(pair: Any) -> TokenOut:
    return TokenOut(access_token=pair.access_token, refresh_token=pair.refresh_token, expires_in=pair.expires_in)


@router.post("/token", response_model=TokenOut)
def login(form: Annotated[OAuth2PasswordRequestForm, Depends()], conn: ConnDep, settings: SettingsDep) -> TokenOut:
    """OAuth2 password flow: the email as `username` and the password, form-encoded."""
    try:
        with role_scope(conn, AUTH):  # no caller yet: the credential lookup role
            user = authenticate_password(conn, form.username, form.password)
            pair = issue_tokens(conn, settings, user)
    except AuthError as exc:
        raise Problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    finally:
        conn.commit()
    return _tokens(pair)


@router.post("/refresh", response_model=TokenOut)
def refresh(body: RefreshIn, conn: ConnDep, settings: SettingsDep) -> TokenOut:
    """A new token pair for a refresh token (the old one keeps working until it expires or a logout)."""
    try:
        with role_scope(conn, AUTH):
            pair = refresh_tokens(conn, settings, body.refresh_token)
    except AuthError as exc:
        raise Problem(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    finally:
        conn.commit()
    return _tokens(pair)


@router.post("/logout", status_code=204)
def logout(caller: CallerDep, conn: ConnDep, request: Request) -> None:
    """End every session of the calling user: all its access and refresh tokens stop working."""
    kind, _, user_id = caller.subject.partition(":")
    if kind != "user":
        raise Problem(422, "API keys do not log out; revoke the key instead (DELETE /api/keys/{id})")
    with role_scope(conn, AUTH):
        end_sessions(conn, user_id)
    credential_cache(request).clear()


@router.get("/me", response_model=MeOut)
def me(caller: CallerDep, conn: ConnDep) -> MeOut:
    """Who the credential is, what it may do, and the features of its tenant."""
    config = effective_config(conn, caller.tenant_id) if caller.tenant_id else None
    return MeOut(
        subject=caller.subject,
        tenant_id=caller.tenant_id,
        role=caller.role,
        permissions=sorted(caller.permissions),
        visible_tenants=list(caller.visible),
        plan=caller.plan,
        features=config.features if config else {},
    )
