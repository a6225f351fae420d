"""Roles, scopes, passwords, tokens and the production secret rule, without services."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from sensormine.identity.roles import ROLE_PERMISSIONS, Role, expand_scopes, may_grant
from sensormine.identity.tokens import DEV_JWT_SECRET, decode_token, jwt_secret
from sensormine.identity.users import AuthError, hash_password, verify_password
from sensormine.settings import Settings


def test_roles_nest_and_device_stands_apart() -> None:
    viewer, operator = ROLE_PERMISSIONS[Role.VIEWER], ROLE_PERMISSIONS[Role.OPERATOR]
    admin, platform = ROLE_PERMISSIONS[Role.TENANT_ADMIN], ROLE_PERMISSIONS[Role.PLATFORM_ADMIN]
    assert viewer < operator < admin < platform
    assert all(p.endswith(":read") for p in viewer)
    assert ROLE_PERMISSIONS[Role.DEVICE] == {"telemetry:write"}
    assert "tenants:plan" in platform and "tenants:plan" not in admin


def test_scopes_expand_and_reject_unknown_names() -> None:
    assert "devices:read" in expand_scopes(["read"]) and "devices:write" not in expand_scopes(["read"])
    assert expand_scopes(["devices:read", "telemetry:read"]) == {"devices:read", "telemetry:read"}
    with pytest.raises(AuthError, match="unknown scope"):
        expand_scopes(["admin"])


def test_nobody_grants_above_themselves() -> None:
    assert may_grant(Role.TENANT_ADMIN, Role.OPERATOR) and may_grant(Role.TENANT_ADMIN, Role.TENANT_ADMIN)
    assert not may_grant(Role.OPERATOR, Role.TENANT_ADMIN)
    assert not may_grant(Role.TENANT_ADMIN, Role.PLATFORM_ADMIN)
    assert may_grant(Role.PLATFORM_ADMIN, Role.PLATFORM_ADMIN)
    assert may_grant(Role.OPERATOR, Role.DEVICE) and not may_grant(Role.DEVICE, Role.VIEWER)


def test_password_hashes_are_salted_and_verify() -> None:
    a, b = hash_password("correct horse battery"), hash_password("correct horse battery")
    assert a != b and a.startswith("scrypt$")
    assert verify_password("correct horse battery", a) and verify_password("correct horse battery", b)
    assert not verify_password("correct horse batterx", a)
    assert not verify_password("anything", "not-a-hash")


def test_development_generates_a_secret_into_the_state_dir(tmp_path: Path) -> None:
    """Regression: development environments signed every token with one fixed, public secret."""
    first = jwt_secret(Settings(env="dev", state_dir=tmp_path))
    assert first != DEV_JWT_SECRET and len(first) >= 32
    stored = tmp_path / "jwt-secret"
    assert stored.read_text().strip() == first and stored.stat().st_mode & 0o777 == 0o600
    assert jwt_secret(Settings(env="dev", state_dir=tmp_path, jwt_secret=DEV_JWT_SECRET)) == first
    assert jwt_secret(Settings(env="dev", state_dir=tmp_path / "other")) != first  # another state dir, another one


def test_production_refuses_the_default_secret() -> None:
    with pytest.raises(AuthError, match="SENSORMINE_JWT_SECRET is unset"):
        jwt_secret(Settings(env="prod"))
    with pytest.raises(AuthError, match="SENSORMINE_JWT_SECRET is unset"):
        jwt_secret(Settings(env="prod", jwt_secret=DEV_JWT_SECRET))
    with pytest.raises(AuthError, match="at least 32"):
        jwt_secret(Settings(env="prod", jwt_secret="short"))
    good = "x" * 40
    assert jwt_secret(Settings(env="prod", jwt_secret=good)) == good


def test_tokens_check_signature_type_and_expiry() -> None:
    settings = Settings(env="prod", jwt_secret="s" * 40)
    now = int(time.time())
    access = jwt.encode({"sub": "u", "typ": "access", "exp": now + 60}, "s" * 40, algorithm="HS256")
    assert decode_token(settings, access, "access")["sub"] == "u"
    with pytest.raises(AuthError, match="where a refresh token is needed"):
        decode_token(settings, access, "refresh")
    forged = jwt.encode({"sub": "u", "typ": "access", "exp": now + 60}, "t" * 40, algorithm="HS256")
    with pytest.raises(AuthError, match="invalid"):
        decode_token(settings, forged, "access")
    expired = jwt.encode({"sub": "u", "typ": "access", "exp": now - 5}, "s" * 40, algorithm="HS256")
    with pytest.raises(AuthError, match="expired"):
        decode_token(settings, expired, "access")
    unsigned = jwt.encode({"sub": "u", "typ": "access", "exp": now + 60}, None, algorithm="none")
    with pytest.raises(AuthError, match="invalid"):
        decode_token(settings, unsigned, "access")


def test_the_app_refuses_to_start_in_production_with_the_default_secret() -> None:
    from serving.main import create_app

    with pytest.raises(AuthError, match="SENSORMINE_JWT_SECRET"):
        create_app(Settings(env="prod"))
    assert create_app(Settings(env="prod", jwt_secret="p" * 40)).title == "Sensormine API"
