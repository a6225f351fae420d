"""Tenant configuration that cascades down the hierarchy: plan, settings, feature flags and branding.

Each tenant stores only what it overrides. What applies to a tenant is its ancestors' values,
root first, each overridden key by key by the next level down, and finally its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from sensormine.clients.postgres import AUTH, role_scope
from sensormine.tenancy.plans import PLANS

# Feature flags every plan starts from; a tenant (or an ancestor) overrides them key by key.
PLAN_FEATURES: dict[str, dict[str, bool]] = {
    "free": {"ai_schema_generation": False, "sub_tenants": False, "sql_access": False, "anomaly_detection": False},
    "pro": {"ai_schema_generation": True, "sub_tenants": True, "sql_access": True, "anomaly_detection": False},
    "enterprise": {"ai_schema_generation": True, "sub_tenants": True, "sql_access": True, "anomaly_detection": True},
}
assert set(PLAN_FEATURES) == set(PLANS)


@dataclass(frozen=True)
class EffectiveConfig:
    """What applies to one tenant, and which tenant each value comes from."""

    tenant_id: str
    plan: str
    plan_from: str
    settings: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    branding: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # "features.sql_access" -> tenant that set it


def effective_config(conn: psycopg.Connection, tenant_id: str) -> EffectiveConfig | None:
    """The cascaded configuration of a tenant, or None when it does not exist.

    Read as the auth role: a sub-tenant inherits from ancestors its own scope may not read (callers
    check that the tenant is visible to them first).
    """
    with role_scope(conn, AUTH):
        rows = conn.execute(
            "SELECT a.id, a.plan, t.settings, t.features, t.branding, sensormine_payment_lapsed(a.id) "
            "FROM sensormine_tenant_ancestors(%s) a "
            "JOIN tenants t ON t.id = a.id ORDER BY a.depth DESC",
            (tenant_id,),
        ).fetchall()
    if not rows:
        return None
    plan, plan_from = "free", rows[0][0]
    for tid, p, *_, lapsed in rows:
        if p is not None:  # the nearest plan; free while its payer is past the grace period of an unpaid invoice
            plan, plan_from = ("free" if lapsed else p), tid
    merged: dict[str, dict[str, Any]] = {"settings": {}, "features": dict(PLAN_FEATURES[plan]), "branding": {}}
    sources: dict[str, str] = {f"features.{k}": f"plan:{plan}" for k in merged["features"]}
    for tid, _p, settings, features, branding, _lapsed in rows:
        for name, values in (("settings", settings), ("features", features), ("branding", branding)):
            for k, v in values.items():
                merged[name][k] = v
                sources[f"{name}.{k}"] = tid
    return EffectiveConfig(
        tenant_id, plan, plan_from, merged["settings"], merged["features"], merged["branding"], sources
    )
