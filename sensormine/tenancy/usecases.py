"""Tenant use cases, shared by `POST /api/tenants` and `sensormine tenant create`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sensormine.audit import log as audit
from sensormine.clients.kafka import ensure_topics
from sensormine.settings import Settings
from sensormine.tenancy.config import effective_config
from sensormine.tenancy.plans import PLANS
from sensormine.tenancy.tenants import RegistryError, Tenant, UnknownTenant, create_tenant

log = logging.getLogger(__name__)


class TenantRefused(RegistryError):
    """The tenant may not be created here (the parent's plan has no sub-tenants)."""


def tenant_topics(settings: Settings, tenant_id: str) -> list[str]:
    """The Kafka topics a tenant needs from the start: its telemetry topic and the shared dead-letter topic."""
    return [settings.telemetry_topic(tenant_id), settings.dlq_topic]


def register_tenant(
    conn: psycopg.Connection,
    actor: audit.Actor,
    settings: Settings,
    tenant_id: str,
    name: str | None = None,
    parent_id: str | None = None,
    plan: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    features: Mapping[str, bool | None] | None = None,
    branding: Mapping[str, Any] | None = None,
) -> Tenant:
    """Create a tenant with its configuration, audited, and provision its Kafka topics.

    A top-level tenant without a plan is on the free plan; a sub-tenant without one inherits its
    parent's. A sub-tenant needs a parent whose plan has the `sub_tenants` feature (platform
    operators may create one anyway). Raises UnknownTenant (no such parent), TenantRefused, and
    RegistryError (bad id or plan, or the id is taken).
    """
    if plan is not None and plan not in PLANS:
        raise RegistryError(f"plan must be one of {', '.join(PLANS)}")
    if parent_id is not None:
        # The parent's whole ancestor chain decides its plan, also above what the actor can see.
        parent = effective_config(conn, parent_id)
        conn.commit()  # end the read, so the scope below is a transaction of its own (SET LOCAL ROLE)
        if parent is None:
            raise UnknownTenant(f"tenant {parent_id!r} not found")
        if not actor.is_platform and not parent.features.get("sub_tenants"):
            raise TenantRefused(
                f"tenant {parent_id!r} may not have sub-tenants: its plan ({parent.plan}) does not include the "
                "sub_tenants feature; upgrade the plan or ask a platform administrator to enable it"
            )
    # The new tenant joins the actor's subtree; the session must see it to configure and audit it.
    with actor.scope(conn, write=True, also=(tenant_id,)):
        try:
            tenant = create_tenant(conn, tenant_id, name, parent_id, plan)
        except psycopg.errors.InsufficientPrivilege:
            raise UnknownTenant(f"tenant {parent_id!r} not found") from None
        config, features, branding = dict(config or {}), dict(features or {}), dict(branding or {})
        if config or features or branding:
            conn.execute(
                "UPDATE tenants SET settings = %s, features = %s, branding = %s WHERE id = %s",
                (Jsonb(config), Jsonb(features), Jsonb(branding), tenant_id),
            )
        detail = {
            "name": tenant.name,
            "parent_id": parent_id,
            "plan": tenant.plan,
            **({"settings": config} if config else {}),
            **({"features": features} if features else {}),
            **({"branding": branding} if branding else {}),
        }
        audit.record(conn, actor, parent_id or tenant_id, "tenant.create", "tenant", tenant_id, detail)
    _provision_topics(settings, tenant_id)
    return tenant


def _provision_topics(settings: Settings, tenant_id: str) -> None:
    """Brokers in production often refuse to auto-create topics: make the tenant's now (a failure is logged)."""
    if not settings.kafka_bootstrap:
        return
    try:
        ensure_topics(tenant_topics(settings, tenant_id), settings=settings)
    except Exception as exc:  # the tenant exists; its topic is also auto-created on first use where allowed
        log.warning("tenant %s created, but its Kafka topics could not be created: %s", tenant_id, exc)


_UNSET: Any = object()


def _merge_sql(column: str, changes: Mapping[str, Any], sets: list[str], params: list[Any]) -> None:
    """`column = (column || set keys) - removed keys`: a key set to None loses the tenant's own value."""
    keep = {k: v for k, v in changes.items() if v is not None}
    drop = [k for k, v in changes.items() if v is None]
    sets.append(f"{column} = ({column} || %s) - %s::text[]")
    params.extend([Jsonb(keep), drop])


def change_tenant(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    *,
    name: str | None = None,
    plan: str | None = _UNSET,
    config: Mapping[str, Any] | None = None,
    features: Mapping[str, bool | None] | None = None,
    branding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Change a tenant's name or plan (None: inherit) and merge overrides (a key set to None is removed), audited.

    Returns what changed (empty: nothing to do). Raises UnknownTenant.
    """
    sets: list[str] = []
    params: list[Any] = []
    changed: dict[str, Any] = {}
    if name is not None:
        sets.append("name = %s")
        params.append(name)
        changed["name"] = name
    if plan is not _UNSET:
        sets.append("plan = %s")
        params.append(plan)
        changed["plan"] = plan
    for column, values in (("settings", config), ("features", features), ("branding", branding)):
        if values:
            _merge_sql(column, values, sets, params)
            changed[column] = dict(values)
    if not sets:
        return changed
    with actor.scope(conn, write=True):
        row = conn.execute(
            f"UPDATE tenants SET {', '.join(sets)}, updated_at = now() WHERE id = %s RETURNING id",
            (*params, tenant_id),
        ).fetchone()
        if row is None:
            raise UnknownTenant(f"tenant {tenant_id!r} not found")
        audit.record(conn, actor, tenant_id, "tenant.update", "tenant", tenant_id, changed)
    return changed
