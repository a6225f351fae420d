"""The schema registry of the caller's tenants: versioned JSON Schemas of each device type's payload.

Registering checks compatibility with the previous version (docs/schemas.md); an incompatible version
is refused (409, with every break listed) unless a tenant administrator forces it. Candidates can be
checked and sample payloads validated without registering anything. Changes are audited in the same
transaction, under row-level security (`Caller.scope`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from sensormine.audit import log as audit
from sensormine.devices.registry import check_device_type
from sensormine.identity.roles import Role
from sensormine.schemas.compat import IncompatibleSchema, SchemaError
from sensormine.schemas.store import (
    SchemaInUse,
    SchemaVersion,
    check_compatibility,
    delete_schemas,
    get_schema,
    page_device_types,
    page_schema_versions,
    register_schema_version,
)
from sensormine.schemas.validation import CompiledSchema, validate_sample
from sensormine.tenancy.tenants import RegistryError
from serving.deps import Caller, ConnDep, authenticate
from serving.pagination import Page, PageDep
from serving.problems import Problem

router = APIRouter(prefix="/api/schemas", tags=["schemas"])

Reader = Annotated[Caller, Security(authenticate, scopes=["schemas:read"])]
Writer = Annotated[Caller, Security(authenticate, scopes=["schemas:write"])]
TenantParam = Annotated[str | None, Query(description="A sub-tenant; the caller's own tenant by default")]
DeviceType = Annotated[str, Path(description="The device type (devices.device_type)", max_length=128)]
FORCE_ROLES = frozenset({Role.TENANT_ADMIN, Role.PLATFORM_ADMIN})
MAX_SAMPLE_ITEMS = 10_000
MAX_SAMPLE_ERRORS = 100

EXAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "ts": {"type": "string"},
        "values": {
            "type": "object",
            "properties": {"temperature": {"type": "number", "minimum": -40, "maximum": 120}},
            "required": ["temperature"],
        },
    },
    "required": ["ts", "values"],
}


class SchemaVersionOut(BaseModel):
    """One version of a device type's schema."""

    tenant_id: str
    device_type: str
    version: int
    definition: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, stored: SchemaVersion) -> SchemaVersionOut:
        """The answer for a stored version."""
        return cls(
            tenant_id=stored.tenant_id,
            device_type=stored.device_type,
            version=stored.version,
            definition=stored.definition,
            created_at=stored.created_at,
        )


class RegisteredOut(SchemaVersionOut):
    """A newly registered version; `problems` lists the breaks a forced registration accepted."""

    forced: bool
    problems: list[str]


class DeviceTypeOut(BaseModel):
    """A device type with schemas: its latest version, and how many of the tenant's devices have the type."""

    tenant_id: str
    device_type: str
    latest_version: int
    versions: int
    updated_at: datetime = Field(description="When the latest version was registered")
    devices: int


class SchemaIn(BaseModel):
    """A new version: the JSON Schema of one payload item; `force` accepts a break (tenant administrators)."""

    model_config = ConfigDict(extra="forbid")

    definition: dict[str, Any] = Field(examples=[EXAMPLE_SCHEMA])
    force: bool = Field(False, description="Register even if incompatible with the latest version (tenant_admin)")


class CandidateIn(BaseModel):
    """A candidate definition to check against the latest version."""

    model_config = ConfigDict(extra="forbid")

    definition: dict[str, Any] = Field(examples=[EXAMPLE_SCHEMA])


class CompatibilityOut(BaseModel):
    """Whether a candidate could be registered without `force`, and why not."""

    tenant_id: str
    device_type: str
    compatible: bool
    against_version: int | None = Field(description="The latest version it was compared with; null: none yet")
    problems: list[str]


class SampleIn(BaseModel):
    """A sample device payload: one item `{"ts", "values", "quality"?}` or an array of them."""

    model_config = ConfigDict(extra="forbid")

    payload: Any = Field(examples=[{"ts": "2026-11-26T10:00:00Z", "values": {"temperature": 150}}])
    version: int | None = Field(
        None, ge=1, le=2**31 - 1, description="The version to validate against; the latest by default"
    )


class SampleErrorOut(BaseModel):
    """One reason the sample would be rejected on ingest."""

    index: int | None = Field(description="The item, when the payload is an array")
    pointer: str = Field(description="JSON pointer into the payload as sent")
    message: str
    stage: str = Field(description="payload: the ingest parser refuses it; schema: it breaks the schema")


class ValidationOut(BaseModel):
    """The verdict on a sample payload."""

    tenant_id: str
    device_type: str
    version: int
    valid: bool
    items: int
    errors: list[SampleErrorOut]


def _no_schema(device_type: str, tenant: str) -> Problem:
    return Problem(
        404,
        f"device type {device_type!r} of tenant {tenant!r} has no schema; "
        f"register one with POST /api/schemas/{device_type}",
    )


@router.get("", response_model=Page[DeviceTypeOut])
def list_types(caller: Reader, conn: ConnDep, page: PageDep, tenant_id: TenantParam = None) -> dict[str, Any]:
    """The tenant's device types that have schemas, by name, with their latest version."""
    tenant = caller.tenant(tenant_id)
    if page.after is not None and not isinstance(page.after, str):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    with caller.scope(conn):
        types = page_device_types(conn, tenant, after=page.after, limit=page.limit + 1)
    return page.page([DeviceTypeOut(**vars(t)) for t in types], key=lambda t: t.device_type)


@router.post(
    "/{device_type}",
    response_model=RegisteredOut,
    status_code=201,
    responses={
        403: {"description": "force needs a tenant administrator"},
        409: {"description": "Incompatible with the latest version; `problems` lists every break"},
        422: {"description": "Not a valid JSON Schema, or a bad device type name"},
    },
)
def register(
    device_type: DeviceType,
    body: SchemaIn,
    caller: Writer,
    conn: ConnDep,
    response: Response,
    tenant_id: TenantParam = None,
) -> RegisteredOut:
    """Register the next version of a device type's schema (versions start at 1 and are never rewritten).

    Refused (409) when it would break the latest version: a property removed, a type changed, a name
    newly required, a metric range narrowed. A tenant administrator may send `"force": true` to register
    it anyway (the breaks are audited). Devices of the type are validated against it within 30 s.
    """
    tenant = caller.tenant(tenant_id)
    may_force = caller.role in FORCE_ROLES
    try:
        check_device_type(device_type)
        with caller.scope(conn, write=True):
            registered = register_schema_version(
                conn, tenant, device_type, body.definition, force=body.force and may_force
            )
            stored = registered.version
            audit.record(
                conn,
                caller,
                tenant,
                "schema.register",
                "schema",
                f"{device_type}/v{stored.version}",
                {
                    "device_type": device_type,
                    "version": stored.version,
                    "forced": bool(registered.problems),
                    "problems": registered.problems,
                },
            )
    except IncompatibleSchema as exc:
        if body.force and not may_force:
            raise Problem(
                403,
                f"forcing an incompatible schema needs a tenant_admin (this caller's role is {caller.role}); "
                f"the breaks: {'; '.join(exc.problems)}",
                problems=exc.problems,
                against_version=exc.previous,
            ) from None
        raise Problem(
            409,
            f"version {exc.previous + 1} of {device_type!r} would break version {exc.previous}: "
            f"{'; '.join(exc.problems)}. Fix the definition (check candidates with "
            f'POST /api/schemas/{device_type}/compatibility), or, as a tenant_admin, send "force": true',
            problems=exc.problems,
            against_version=exc.previous,
        ) from None
    except (SchemaError, RegistryError) as exc:
        raise Problem(422, str(exc)) from None
    response.headers["Location"] = f"/api/schemas/{device_type}/versions/{stored.version}" + (
        "" if tenant == caller.tenant_id else f"?tenant_id={tenant}"
    )
    return RegisteredOut(
        **SchemaVersionOut.of(stored).model_dump(), forced=bool(registered.problems), problems=registered.problems
    )


@router.get("/{device_type}", response_model=SchemaVersionOut)
def latest(device_type: DeviceType, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> SchemaVersionOut:
    """The latest version of a device type's schema: the one its devices are validated against."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        stored = get_schema(conn, tenant, device_type)
    if stored is None:
        raise _no_schema(device_type, tenant)
    return SchemaVersionOut.of(stored)


@router.get("/{device_type}/versions", response_model=Page[SchemaVersionOut])
def versions(
    device_type: DeviceType, caller: Reader, conn: ConnDep, page: PageDep, tenant_id: TenantParam = None
) -> dict[str, Any]:
    """Every version of a device type's schema, oldest first."""
    tenant = caller.tenant(tenant_id)
    if page.after is not None and (not isinstance(page.after, int) or isinstance(page.after, bool)):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    with caller.scope(conn):
        found = page_schema_versions(conn, tenant, device_type, after=page.after, limit=page.limit + 1)
    if not found and page.after is None:
        raise _no_schema(device_type, tenant)
    return page.page([SchemaVersionOut.of(v) for v in found], key=lambda v: v.version)


@router.get("/{device_type}/versions/{version}", response_model=SchemaVersionOut)
def one_version(
    device_type: DeviceType,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
    caller: Reader,
    conn: ConnDep,
    tenant_id: TenantParam = None,
) -> SchemaVersionOut:
    """One version of a device type's schema."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        stored = get_schema(conn, tenant, device_type, version)
    if stored is None:
        raise Problem(
            404,
            f"device type {device_type!r} of tenant {tenant!r} has no schema version {version}; "
            f"GET /api/schemas/{device_type}/versions lists them",
        )
    return SchemaVersionOut.of(stored)


@router.delete(
    "/{device_type}",
    status_code=204,
    responses={409: {"description": "Devices still have the type"}},
)
def remove(device_type: DeviceType, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Response:
    """Delete every version of a device type's schema, once no device of the tenant has the type (409 otherwise).

    Single versions cannot be deleted (versions are never rewritten): to undo one, register the
    previous definition again. After a deletion, a new registration starts at version 1.
    """
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn, write=True):
            deleted = delete_schemas(conn, tenant, device_type)
            if deleted:
                detail = {"device_type": device_type, "versions": deleted}
                audit.record(conn, caller, tenant, "schema.delete", "schema", device_type, detail)
    except SchemaInUse as exc:
        raise Problem(409, str(exc), devices=exc.devices, examples=exc.examples) from None
    if not deleted:
        raise _no_schema(device_type, tenant)
    return Response(status_code=204)


@router.post(
    "/{device_type}/compatibility",
    response_model=CompatibilityOut,
    responses={422: {"description": "Not a valid JSON Schema"}},
)
def compatibility(
    device_type: DeviceType, body: CandidateIn, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None
) -> CompatibilityOut:
    """Check a candidate against the latest version without registering it: compatible, or every break."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            against, problems = check_compatibility(conn, tenant, device_type, body.definition)
    except SchemaError as exc:
        raise Problem(422, str(exc)) from None
    return CompatibilityOut(
        tenant_id=tenant, device_type=device_type, compatible=not problems, against_version=against, problems=problems
    )


@router.post("/{device_type}/validate", response_model=ValidationOut)
def validate(
    device_type: DeviceType, body: SampleIn, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None
) -> ValidationOut:
    """Validate a sample payload as ingest would: parsed like a device payload, then checked against the schema.

    Every error is listed (up to 100) with a JSON pointer into the payload as sent; ingest itself rejects
    a message at its first error.
    """
    tenant = caller.tenant(tenant_id)
    if isinstance(body.payload, list) and len(body.payload) > MAX_SAMPLE_ITEMS:
        raise Problem(413, f"more than {MAX_SAMPLE_ITEMS} items in the sample: send fewer")
    with caller.scope(conn):
        stored = get_schema(conn, tenant, device_type, body.version)
    if stored is None:
        if body.version is None:
            raise _no_schema(device_type, tenant)
        raise Problem(
            404,
            f"device type {device_type!r} of tenant {tenant!r} has no schema version {body.version}; "
            f"GET /api/schemas/{device_type}/versions lists them",
        )
    schema = CompiledSchema(tenant, device_type, stored.version, stored.definition)
    items, errors = validate_sample(schema, body.payload, MAX_SAMPLE_ERRORS)
    return ValidationOut(
        tenant_id=tenant,
        device_type=device_type,
        version=stored.version,
        valid=not errors,
        items=items,
        errors=[SampleErrorOut(**vars(e)) for e in errors],
    )
