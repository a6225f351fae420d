"""Tenants and sub-tenants: create, read with the configuration that cascades to them, and change.

Who may do what:
- platform administrators create top-level tenants (with a plan) and change anything anywhere;
- tenant administrators create sub-tenants under any tenant they can see, when the parent's `sub_tenants`
  feature is on, and change the name, settings and branding of their tenant and its subtree, and the
  feature flags of their sub-tenants (never their own, and never switching on a feature their own tenant lacks);
- plans change only with the `tenants:plan` permission (platform administrators).

A tenant outside the caller's subtree (its parent, a sibling) is answered as not found. Every change is
written to the audit log in the same transaction.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Request, Response, Security
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sensormine.billing.usecases import sign_up_tenant, update_tenant
from sensormine.settings import Settings
from sensormine.tenancy.config import PLAN_FEATURES, effective_config
from sensormine.tenancy.plans import PLANS
from sensormine.tenancy.tenants import (
    TENANT_ID_RE,
    RegistryError,
    TenantRecord,
    UnknownTenant,
    get_tenant_record,
    page_tenants,
    parent_of,
)
from sensormine.tenancy.usecases import TenantRefused
from serving.deps import Caller, ConnDep, SettingsDep, authenticate, credential_cache
from serving.pagination import Page, PageDep
from serving.problems import Problem

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/tenants", tags=["tenants"])

Reader = Annotated[Caller, Security(authenticate, scopes=["tenants:read"])]
Writer = Annotated[Caller, Security(authenticate, scopes=["tenants:write"])]

FEATURE_FLAGS = frozenset().union(*(set(f) for f in PLAN_FEATURES.values()))
SETTING_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
COLOR_RE = r"^#[0-9a-fA-F]{6}$"
URL_RE = r"^https?://[^\s/$.?#][^\s]*$"
DOMAIN_RE = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
MAX_SETTINGS = 100


# --- request and response bodies ---------------------------------------------------------------------------


class Branding(BaseModel):
    """Branding a tenant overrides; a field set to null removes the override (the parent's value applies)."""

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(None, min_length=1, max_length=100, description="Name shown in the UI")
    logo_url: str | None = Field(None, max_length=2048, pattern=URL_RE, description="http(s) URL of the logo")
    favicon_url: str | None = Field(None, max_length=2048, pattern=URL_RE, description="http(s) URL of the icon")
    primary_color: str | None = Field(None, pattern=COLOR_RE, description="#rrggbb")
    secondary_color: str | None = Field(None, pattern=COLOR_RE, description="#rrggbb")
    accent_color: str | None = Field(None, pattern=COLOR_RE, description="#rrggbb")
    domain: str | None = Field(
        None, max_length=253, pattern=DOMAIN_RE, description="Custom domain, e.g. iot.example.com"
    )
    support_email: str | None = Field(None, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    @field_validator("domain", mode="before")
    @classmethod
    def _lower_domain(cls, v: Any) -> Any:
        return v.strip().lower().rstrip(".") if isinstance(v, str) else v


def _check_settings(v: dict[str, Any] | None) -> dict[str, Any] | None:
    if v is None:
        return v
    if len(v) > MAX_SETTINGS:
        raise ValueError(f"at most {MAX_SETTINGS} settings per request")
    bad = [k for k in v if not SETTING_KEY_RE.match(k)]
    if bad:
        raise ValueError(f"setting names are 1-64 of letters, digits, '_', '.', '-' starting with a letter: {bad}")
    return v


def _check_features(v: dict[str, bool | None] | None) -> dict[str, bool | None] | None:
    if v is None:
        return v
    unknown = sorted(set(v) - FEATURE_FLAGS)
    if unknown:
        raise ValueError(f"unknown feature flag(s) {unknown}; known: {sorted(FEATURE_FLAGS)}")
    return v


class TenantCreate(BaseModel):
    """A new tenant: top-level (platform administrators) or under a parent the caller can see."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=TENANT_ID_RE.pattern, description="1-63 of a-z, 0-9 and '-'")
    name: str | None = Field(None, min_length=1, max_length=200)
    parent_id: str | None = Field(
        None,
        description="Parent tenant; omitted: the caller's own tenant (top-level for the platform); "
        "null: top-level (platform administrators only)",
    )
    plan: str | None = Field(None, description="free, pro or enterprise; a sub-tenant without one inherits")
    settings: dict[str, Any] = Field(default_factory=dict)
    features: dict[str, bool] = Field(default_factory=dict)
    branding: Branding = Field(default_factory=Branding)

    _settings = field_validator("settings")(_check_settings)
    _features = field_validator("features")(_check_features)


class TenantPatch(BaseModel):
    """Changes to a tenant; keys left out stay, a key set to null removes the tenant's own override."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    plan: str | None = Field(None, description="Only with tenants:plan; null makes a sub-tenant inherit again")
    settings: dict[str, Any] | None = None
    features: dict[str, bool | None] | None = None
    branding: Branding | None = None

    _settings = field_validator("settings")(_check_settings)
    _features = field_validator("features")(_check_features)


class EffectiveOut(BaseModel):
    """What applies to a tenant after the cascade, and where each value comes from (a tenant id or plan:<name>)."""

    plan: str
    plan_from: str
    settings: dict[str, Any]
    features: dict[str, Any]
    branding: dict[str, Any]
    sources: dict[str, str]


class TenantOut(BaseModel):
    """A tenant and what it overrides itself (`plan` null: inherited from its parent)."""

    id: str
    name: str
    parent_id: str | None
    plan: str | None
    settings: dict[str, Any]
    features: dict[str, Any]
    branding: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class TenantDetailOut(TenantOut):
    """A tenant with its effective configuration."""

    effective: EffectiveOut


class SectionOut(BaseModel):
    """One configuration section (branding or features): the tenant's overrides and what applies."""

    tenant_id: str
    own: dict[str, Any]
    effective: dict[str, Any]
    sources: dict[str, str]


# --- helpers -------------------------------------------------------------------------------------------------


def _out(record: TenantRecord) -> TenantOut:
    return TenantOut(**vars(record))


def _fetch(conn: psycopg.Connection, tenant_id: str) -> TenantOut:
    record = get_tenant_record(conn, tenant_id)
    if record is None:
        raise Problem(404, f"tenant {tenant_id!r} not found")
    return _out(record)


def _effective(conn: psycopg.Connection, tenant_id: str) -> EffectiveOut:
    # As the auth role (inside effective_config): a sub-tenant inherits from ancestors it may not read.
    # Callers check visibility (caller.tenant) first.
    config = effective_config(conn, tenant_id)
    if config is None:
        raise Problem(404, f"tenant {tenant_id!r} not found")
    return EffectiveOut(
        plan=config.plan,
        plan_from=config.plan_from,
        settings=config.settings,
        features=config.features,
        branding=config.branding,
        sources=config.sources,
    )


def _check_plan(caller: Caller, plan: str | None, *, top_level: bool) -> None:
    if not caller.can("tenants:plan"):
        raise Problem(403, "only platform administrators (permission tenants:plan) change plans")
    if plan is None and top_level:
        raise Problem(422, "a top-level tenant needs a plan")
    if plan is not None and plan not in PLANS:
        raise Problem(422, f"plan must be one of {', '.join(PLANS)}")


def _check_features_allowed(
    conn: psycopg.Connection, caller: Caller, tenant_id: str, features: Mapping[str, bool | None]
) -> None:
    """Platform administrators set any flag; tenant administrators only below their own tenant, within its flags."""
    if caller.is_platform or not features:
        return
    if tenant_id == caller.tenant_id:
        raise Problem(403, "feature flags of your own tenant are set by the platform administrators")
    own = effective_config(conn, caller.tenant_id) if caller.tenant_id else None
    lacking = sorted(k for k, v in features.items() if v and not (own and own.features.get(k)))
    if lacking:
        raise Problem(403, f"your own tenant does not have the feature(s) {', '.join(lacking)} to pass on")


def _invalidate(request: Request) -> None:
    # The visible tenants of every cached caller may have changed.
    credential_cache(request).clear()


# --- routes --------------------------------------------------------------------------------------------------


@router.post("", response_model=TenantDetailOut, status_code=201)
def create(
    body: TenantCreate, caller: Writer, conn: ConnDep, settings: SettingsDep, request: Request, response: Response
) -> TenantDetailOut:
    """Create a tenant: top-level (platform administrators, with a plan) or a sub-tenant of one you can see."""
    # parent_id omitted: the caller's own tenant; given as null: top-level, which only the platform may create.
    top_level_asked = "parent_id" in body.model_fields_set and body.parent_id is None
    parent_id = body.parent_id if body.parent_id is not None or caller.is_platform else caller.tenant_id
    if top_level_asked and not caller.is_platform:
        raise Problem(403, "only platform administrators create top-level tenants (parent_id null)")
    if parent_id is None:
        if not caller.is_platform:
            raise Problem(403, "only platform administrators create top-level tenants")
        _check_plan(caller, body.plan or "free", top_level=True)
    else:
        caller.tenant(parent_id)
        if body.plan is not None:
            _check_plan(caller, body.plan, top_level=False)
        _check_features_allowed(conn, caller, body.id, body.features)
    conn.commit()  # the checks' reads end here: the use case opens transactions of its own
    try:
        sign_up_tenant(
            conn,
            caller,
            settings,
            body.id,
            body.name,
            parent_id,
            body.plan,
            config=body.settings,
            features=body.features,
            branding=body.branding.model_dump(exclude_none=True),
        )
    except UnknownTenant as exc:
        raise Problem(404, str(exc)) from None
    except TenantRefused as exc:
        raise Problem(403, str(exc)) from None
    except RegistryError as exc:
        raise Problem(409 if "already exists" in str(exc) else 422, str(exc)) from None
    _invalidate(request)
    response.headers["Location"] = f"/api/tenants/{body.id}"
    with caller.scope(conn, also=(body.id,)):
        out = _fetch(conn, body.id)
    effective = _effective(conn, body.id)
    conn.commit()
    return TenantDetailOut(**out.model_dump(), effective=effective)


@router.get("", response_model=Page[TenantOut])
def list_all(caller: Reader, conn: ConnDep, page: PageDep) -> dict[str, Any]:
    """Tenants you can see (every tenant for platform administrators), by id."""
    with caller.scope(conn):
        records = page_tenants(conn, page.after, page.limit + 1)
    return page.page([_out(r) for r in records], key=lambda t: t.id)


@router.get("/{tenant_id}", response_model=TenantDetailOut)
def read(tenant_id: str, caller: Reader, conn: ConnDep) -> TenantDetailOut:
    """A tenant's own record and the configuration that applies to it, with the source of each value."""
    caller.tenant(tenant_id)
    with caller.scope(conn):
        out = _fetch(conn, tenant_id)
    effective = _effective(conn, tenant_id)
    conn.commit()
    return TenantDetailOut(**out.model_dump(), effective=effective)


@router.get("/{tenant_id}/children", response_model=Page[TenantOut])
def children(tenant_id: str, caller: Reader, conn: ConnDep, page: PageDep) -> dict[str, Any]:
    """The direct sub-tenants of a tenant, by id."""
    caller.tenant(tenant_id)
    with caller.scope(conn):
        records = page_tenants(conn, page.after, page.limit + 1, parent_id=tenant_id)
    return page.page([_out(r) for r in records], key=lambda t: t.id)


def _update(
    conn: psycopg.Connection, caller: Caller, settings: Settings, tenant_id: str, patch: TenantPatch
) -> dict[str, Any]:
    """Apply a patch (permissions checked); the changed fields for the audit log."""
    fields = patch.model_fields_set
    try:
        with caller.scope(conn):
            if "plan" in fields:
                _check_plan(caller, patch.plan, top_level=parent_of(conn, tenant_id) is None)
            if patch.features:
                _check_features_allowed(conn, caller, tenant_id, patch.features)
        branding = patch.branding.model_dump(exclude_unset=True) if patch.branding is not None else None
        plan = {"plan": patch.plan} if "plan" in fields else {}
        return update_tenant(
            conn,
            caller,
            settings,
            tenant_id,
            name=patch.name,
            config=patch.settings,
            features=patch.features,
            branding=branding,
            **plan,
        )
    except UnknownTenant as exc:
        raise Problem(404, str(exc)) from None


@router.patch("/{tenant_id}", response_model=TenantDetailOut)
def update(
    tenant_id: str, patch: TenantPatch, caller: Writer, conn: ConnDep, settings: SettingsDep, request: Request
) -> TenantDetailOut:
    """Change name, settings, branding (your tenant and subtree), features (sub-tenants; anywhere for the platform)
    and plan (platform administrators only). A key set to null removes the tenant's own value."""
    caller.tenant(tenant_id)
    changed = _update(conn, caller, settings, tenant_id, patch)
    if "plan" in changed or "features" in changed:
        _invalidate(request)  # cached callers carry their tenant's plan
    return read(tenant_id, caller, conn)


def _section(conn: psycopg.Connection, caller: Caller, tenant_id: str, section: str) -> SectionOut:
    caller.tenant(tenant_id)
    with caller.scope(conn):
        own = getattr(_fetch(conn, tenant_id), section)
    effective = _effective(conn, tenant_id)
    conn.commit()
    prefix = section + "."
    return SectionOut(
        tenant_id=tenant_id,
        own=own,
        effective=getattr(effective, section),
        sources={k[len(prefix) :]: v for k, v in effective.sources.items() if k.startswith(prefix)},
    )


def _replace(
    conn: psycopg.Connection, caller: Caller, settings: Settings, tenant_id: str, section: str, values: dict[str, Any]
) -> SectionOut:
    """Replace a section: keys not in `values` lose their override."""
    caller.tenant(tenant_id)
    with caller.scope(conn):
        own = getattr(_fetch(conn, tenant_id), section)
    conn.commit()
    changes: dict[str, Any] = {k: None for k in own if k not in values} | values
    _update(conn, caller, settings, tenant_id, TenantPatch.model_validate({section: changes}))
    return _section(conn, caller, tenant_id, section)


@router.get("/{tenant_id}/branding", response_model=SectionOut)
def read_branding(tenant_id: str, caller: Reader, conn: ConnDep) -> SectionOut:
    """The tenant's branding overrides and the branding that applies to it."""
    return _section(conn, caller, tenant_id, "branding")


@router.put("/{tenant_id}/branding", response_model=SectionOut)
def put_branding(tenant_id: str, body: Branding, caller: Writer, conn: ConnDep, settings: SettingsDep) -> SectionOut:
    """Replace the tenant's branding overrides (fields left out inherit from the parent)."""
    return _replace(conn, caller, settings, tenant_id, "branding", body.model_dump(exclude_none=True))


@router.get("/{tenant_id}/features", response_model=SectionOut)
def read_features(tenant_id: str, caller: Reader, conn: ConnDep) -> SectionOut:
    """The tenant's feature-flag overrides and the flags that apply to it (plan defaults, then ancestors)."""
    return _section(conn, caller, tenant_id, "features")


@router.put("/{tenant_id}/features", response_model=SectionOut)
def put_features(
    tenant_id: str, body: dict[str, bool], caller: Writer, conn: ConnDep, settings: SettingsDep, request: Request
) -> SectionOut:
    """Replace the tenant's feature-flag overrides (flags left out follow the plan and the ancestors)."""
    try:
        _check_features(dict(body))
    except ValueError as exc:
        raise Problem(422, str(exc)) from None
    out = _replace(conn, caller, settings, tenant_id, "features", dict(body))
    _invalidate(request)
    return out
