"""Roles and the permissions each grants; scopes that narrow an API key."""

from __future__ import annotations

import enum
from collections.abc import Iterable


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
    {"tenants:read", "devices:read", "schemas:read", "telemetry:read", "dlq:read", "usage:read", "alerts:read"}
)


OPERATOR_PERMISSIONS = VIEWER_PERMISSIONS | {
    "devices:write",
    "schemas:write",
    "telemetry:write",
    "dlq:write",
    "alerts:write",
}


TENANT_ADMIN_PERMISSIONS = OPERATOR_PERMISSIONS | {
    "tenants:write",
    "users:read",
    "users:write",
    "keys:read",
    "keys:write",
    "audit:read",
    "billing:read",
    "billing:write",
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
