"""Devices of the caller's tenants: registration (single and CSV import), keys, status, connection profiles.

Every change runs in a transaction under row-level security (`Caller.scope`) and is audited in it;
the MQTT broker is told after the commit (except a key rotation, which must reach the broker before it
counts). Device keys are returned once, at registration, import or rotation, and never again.
See docs/device-identity.md ("REST API").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import psycopg
from fastapi import APIRouter, Body, Query, Request, Response, Security
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sensormine import audit
from sensormine.dynsec import Dynsec, DynsecError, device_username
from sensormine.profiles import ProfileError, delete_profile, get_profile, set_profile
from sensormine.registry import (
    MAX_IMPORT_ROWS,
    BrokerUpdate,
    Device,
    DeviceRow,
    DuplicateDevice,
    RegistryError,
    UnknownDevice,
    UnknownTenant,
    broker_delete,
    broker_provision,
    broker_revoke,
    create_device,
    delete_device,
    get_device,
    page_devices,
    parse_device_csv,
    revoke_device_key,
    rotate_device_key,
    update_device,
    visible_tenant_ids,
)
from sensormine.settings import Settings
from sensormine.status import device_statuses
from serving.deps import Caller, ConnDep, SettingsDep, authenticate
from serving.limits import device_quota_guard
from serving.pagination import Page, PageDep
from serving.problems import Problem

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/devices", tags=["devices"])

TenantParam = Annotated[str | None, Query(description="A sub-tenant; the key's own tenant by default")]


class DeviceStatusOut(BaseModel):
    """What the ingest paths saw of one device."""

    tenant_id: str
    device_id: str
    online: bool
    last_seen: datetime | None
    last_source: str | None
    messages: int
    readings: int
    errors: int
    last_error: str | None
    last_error_at: datetime | None


class ProfileOut(BaseModel):
    """A device's connection profile and its revision (daemons pick up a new revision live)."""

    tenant_id: str
    device_id: str
    revision: int
    profile: dict[str, Any]


Reader = Annotated[Caller, Security(authenticate, scopes=["devices:read"])]
Writer = Annotated[Caller, Security(authenticate, scopes=["devices:write"])]

# Path segments of this router that a device id would shadow: refused as ids through the API.
RESERVED_DEVICE_IDS = frozenset({"status", "import"})
MAX_IMPORT_BYTES = 1 << 20


class DeviceOut(BaseModel):
    """A registered device. Its key is never shown here: only at registration and rotation."""

    tenant_id: str
    id: str
    name: str
    device_type: str | None = Field(description="Selects the schema its payloads are validated against")
    metadata: dict[str, Any]
    key_state: Literal["active", "revoked"]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, device: Device) -> DeviceOut:
        """The answer for a registry device."""
        assert device.created_at is not None and device.updated_at is not None
        return cls(
            tenant_id=device.tenant_id,
            id=device.id,
            name=device.name,
            device_type=device.device_type,
            metadata=device.metadata,
            key_state="revoked" if device.key_revoked else "active",
            created_at=device.created_at,
            updated_at=device.updated_at,
        )


BrokerState = Annotated[
    Literal["applied", "skipped", "failed"],
    Field(
        description="The MQTT broker's side: applied; skipped (the broker has no per-device identities); "
        "failed (logged: the key works over HTTP; rotate it to use MQTT)"
    ),
]


class DeviceKeyOut(BaseModel):
    """A device key, shown this once: it is stored only as a hash and cannot be retrieved later."""

    tenant_id: str
    device_id: str
    device_key: str = Field(description="Send as X-Device-Key to POST /api/ingest; the MQTT password")
    mqtt_username: str = Field(description="The MQTT user name: {tenant}/{device}")
    broker: BrokerState


class DeviceCreated(DeviceOut):
    """A newly registered device with its key (shown once)."""

    device_key: str = Field(description="Shown once: store it now. Send as X-Device-Key; the MQTT password")
    mqtt_username: str
    broker: BrokerState


class DeviceIn(BaseModel):
    """A device to register."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="1-128 of A-Z a-z 0-9 _ -; unique within the tenant", examples=["press-1"])
    name: str | None = Field(None, description="Display name; the id by default")
    device_type: str | None = Field(None, description="Its schema's device type", examples=["press"])
    metadata: dict[str, Any] = Field(default_factory=dict, description="Your labels (at most 16 KiB as JSON)")


class DevicePatch(BaseModel):
    """Fields to change; omitted fields are kept. `metadata` is merged: a key set to null is removed."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    device_type: str | None = Field(None, description="null clears the type (its payloads are then not validated)")
    metadata: dict[str, Any] | None = None


class RevokedOut(BaseModel):
    """A revoked key: HTTP ingest and the broker refuse it until the key is rotated."""

    tenant_id: str
    device_id: str
    key_state: Literal["revoked"] = "revoked"
    broker: BrokerState


class ImportRowOut(BaseModel):
    """The verdict on one row of an import file."""

    line: int = Field(description="Line of the file where the row ends (the header is line 1)")
    id: str
    status: Literal["accepted", "rejected", "valid"] = Field(
        description="accepted: registered; rejected: see reason; valid: good, but an all_or_nothing import was refused"
    )
    reason: str | None = None
    device_key: str | None = Field(None, description="Shown once, for accepted rows")
    broker: BrokerState | None = None


class ImportOut(BaseModel):
    """What an import did: every row accepted (registered, with its key) or rejected (with the reason)."""

    tenant_id: str
    mode: Literal["per_row", "all_or_nothing"]
    rows: int
    accepted: int
    rejected: int
    results: list[ImportRowOut]


def _broker(settings: Settings) -> Dynsec:
    return Dynsec(settings)


def _not_found(device_id: str, tenant: str) -> Problem:
    return Problem(
        404, f"device {device_id!r} not found in tenant {tenant!r}; GET /api/devices lists the registered ones"
    )


def _location(caller: Caller, tenant: str, device_id: str) -> str:
    return f"/api/devices/{device_id}" + ("" if tenant == caller.tenant_id else f"?tenant_id={tenant}")


def _check_new_id(device_id: str) -> None:
    if device_id in RESERVED_DEVICE_IDS:
        raise RegistryError(
            f"device id {device_id!r} is reserved by the API (/api/devices/{device_id}); choose another"
        )


# -- devices ---------------------------------------------------------------------------------------


@router.post(
    "",
    response_model=DeviceCreated,
    status_code=201,
    responses={
        409: {"description": "The id is taken in the tenant"},
        422: {"description": "Bad id, name, type or metadata"},
        429: {"description": "The plan's device quota is reached"},
    },
)
def register_device(
    body: DeviceIn,
    caller: Writer,
    conn: ConnDep,
    settings: SettingsDep,
    response: Response,
    tenant_id: TenantParam = None,
) -> DeviceCreated:
    """Register a device and return its key, this once (it is stored hashed and cannot be shown again).

    The key authenticates HTTP ingest (`X-Device-Key`) and is the device's MQTT password (user
    `{tenant}/{device}`, which may publish only to `sensormine/{tenant}/{device}/telemetry`).
    """
    tenant = caller.tenant(tenant_id)
    try:
        _check_new_id(body.id)
        with caller.scope(conn, write=True):
            device_quota_guard(conn, tenant, 1)
            device, key = create_device(
                conn, tenant, body.id, body.name, body.device_type, metadata=body.metadata, at_broker=False
            )
            audit.record(
                conn,
                caller,
                tenant,
                "device.create",
                "device",
                device.id,
                {"name": device.name, "device_type": device.device_type, "metadata": device.metadata},
            )
    except DuplicateDevice as exc:
        raise Problem(
            409,
            f"{exc}: choose another id, or give the existing device a new key (POST /api/devices/{body.id}/rotate-key)",
        ) from None
    except UnknownTenant as exc:
        raise Problem(404, str(exc)) from None
    except RegistryError as exc:
        raise Problem(422, str(exc)) from None
    state = broker_provision(tenant, device.id, key, _broker(settings))
    response.headers["Location"] = _location(caller, tenant, device.id)
    response.headers["Cache-Control"] = "no-store"
    return DeviceCreated(
        **DeviceOut.of(device).model_dump(),
        device_key=key,
        mqtt_username=device_username(tenant, device.id),
        broker=state.value,
    )


@router.get("", response_model=Page[DeviceOut])
def list_devices(
    caller: Reader,
    conn: ConnDep,
    page: PageDep,
    tenant_id: TenantParam = None,
    device_type: Annotated[str | None, Query(description="Only devices of this type")] = None,
    include_subtenants: Annotated[bool, Query(description="Also the devices of the tenant's sub-tenants")] = False,
) -> dict[str, Any]:
    """Devices of a tenant (and, with include_subtenants, of its sub-tenants), by tenant and id, a page at a time."""
    tenant = caller.tenant(tenant_id)
    after = page.after
    if after is not None and not (
        isinstance(after, list) and len(after) == 2 and all(isinstance(a, str) for a in after)
    ):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    with caller.scope(conn):
        tenants = (
            [t for t in visible_tenant_ids(conn, tenant) if t in caller.visible] if include_subtenants else [tenant]
        )
        devices = page_devices(
            conn, tenants, device_type=device_type, after=tuple(after) if after else None, limit=page.limit + 1
        )
    return page.page([DeviceOut.of(d) for d in devices], key=lambda d: [d.tenant_id, d.id])


@router.get("/status", response_model=list[DeviceStatusOut])
def list_status(
    caller: Reader, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> list[DeviceStatusOut]:
    """Status of every device of a tenant: online (heard from within the offline timeout), counters."""
    tenant = caller.tenant(tenant_id)
    rows = device_statuses(conn, [tenant], settings.device_offline_after_s)
    return [DeviceStatusOut(**vars(s)) for s in rows]


@router.get("/{device_id}/status", response_model=DeviceStatusOut)
def one_status(
    device_id: str, caller: Reader, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> DeviceStatusOut:
    """Status of one device."""
    tenant = caller.tenant(tenant_id)
    rows = device_statuses(conn, [tenant], settings.device_offline_after_s, [device_id])
    if not rows:
        raise Problem(404, f"device {device_id!r} not found in tenant {tenant!r}")
    return DeviceStatusOut(**vars(rows[0]))


@router.get("/{device_id}/profile", response_model=ProfileOut)
def read_profile(device_id: str, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> ProfileOut:
    """The device's OPC UA or Modbus connection profile."""
    tenant = caller.tenant(tenant_id)
    stored = get_profile(conn, tenant, device_id)
    if stored is None:
        raise Problem(404, f"device {device_id!r} of tenant {tenant!r} has no profile")
    return ProfileOut(
        tenant_id=tenant, device_id=device_id, revision=stored.revision, profile=stored.profile.model_dump(mode="json")
    )


@router.put("/{device_id}/profile", response_model=ProfileOut)
def write_profile(
    device_id: str,
    caller: Writer,
    conn: ConnDep,
    profile: Annotated[
        dict[str, Any],
        Body(
            examples=[
                {
                    "protocol": "modbus",
                    "host": "10.0.0.7",
                    "unit_id": 1,
                    "poll_interval_ms": 1000,
                    "points": [{"metric": "pressure", "address": 0, "data_type": "float32", "scale": 0.1}],
                }
            ]
        ),
    ],
    tenant_id: TenantParam = None,
) -> ProfileOut:
    """Create or replace the profile; the device's daemon applies it without a restart."""
    tenant = caller.tenant(tenant_id)
    try:
        stored = set_profile(conn, tenant, device_id, profile)
    except ProfileError as exc:
        status = 404 if "no device" in str(exc) else 422
        raise Problem(status, str(exc)) from None
    return ProfileOut(
        tenant_id=tenant, device_id=device_id, revision=stored.revision, profile=stored.profile.model_dump(mode="json")
    )


@router.delete("/{device_id}/profile", status_code=204)
def remove_profile(device_id: str, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Response:
    """Remove the profile; the daemon disconnects from the device."""
    tenant = caller.tenant(tenant_id)
    if not delete_profile(conn, tenant, device_id):
        raise Problem(404, f"device {device_id!r} of tenant {tenant!r} has no profile")
    return Response(status_code=204)


@router.post(
    "/import",
    response_model=ImportOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": 'id,name,device_type,metadata\npress-1,Press 1,press,"{""site"": ""north""}"\n',
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        }
    },
    responses={
        413: {"description": f"More than {MAX_IMPORT_BYTES} bytes or {MAX_IMPORT_ROWS} rows: split the file"},
        415: {"description": "Neither text/csv nor multipart/form-data"},
        422: {"description": "Not a usable CSV file; or, all_or_nothing, a row was rejected (nothing registered)"},
        429: {"description": "The devices would exceed the plan's device quota (nothing registered)"},
    },
)
async def import_devices(
    request: Request,
    caller: Writer,
    conn: ConnDep,
    settings: SettingsDep,
    tenant_id: TenantParam = None,
    mode: Annotated[
        Literal["per_row", "all_or_nothing"],
        Query(description="per_row: register every good row; all_or_nothing: register none if any row is rejected"),
    ] = "per_row",
) -> ImportOut:
    """Register devices from a CSV file: header `id[,name][,device_type][,metadata]`, one device per row.

    `metadata` is a JSON object in a quoted CSV field (`"{""site"": ""north""}"`). Send the file as
    the `text/csv` body or as the `file` part of a `multipart/form-data` upload. Each row is accepted
    (registered: its key is in the answer, this once) or rejected with the reason (bad field, id repeated
    in the file, id already registered). The device quota is checked for all the rows at once: if they
    do not fit, nothing is registered (429). At most 1 MiB and 1000 rows per file.
    """
    tenant = caller.tenant(tenant_id)
    raw = await _import_body(request)
    try:
        rows = parse_device_csv(raw)
    except RegistryError as exc:
        status = 413 if "split the file" in str(exc) else 422
        raise Problem(status, str(exc)) from None
    return await run_in_threadpool(_import, caller, conn, settings, tenant, rows, mode)


async def _import_body(request: Request) -> bytes:
    """The CSV bytes of an import request: the body itself, or the first file part of a multipart form."""
    declared = request.headers.get("content-length")
    too_big = f"the import is larger than {MAX_IMPORT_BYTES} bytes: split the file"
    if declared and declared.isdigit() and int(declared) > MAX_IMPORT_BYTES + 64 * 1024:
        raise Problem(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_IMPORT_BYTES + 64 * 1024:  # room for multipart framing
            raise Problem(413, too_big)
        chunks.append(chunk)
    body = b"".join(chunks)
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media in ("text/csv", "text/plain", "application/csv"):
        data = body
    elif media == "multipart/form-data":
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
        upload = form.get("file") or next((v for v in form.values() if not isinstance(v, str)), None)
        if upload is None or isinstance(upload, str):
            raise Problem(422, "the multipart form has no file: send the CSV as the part named 'file'")
        data = await upload.read()
    else:
        raise Problem(415, f"content type {media or 'none'!r} is not accepted: send text/csv, or multipart/form-data")
    if len(data) > MAX_IMPORT_BYTES:
        raise Problem(413, too_big)
    return data


class _Rejected(Exception):
    """Rolls an all-or-nothing import back."""


def _import(
    caller: Caller, conn: psycopg.Connection, settings: Settings, tenant: str, rows: list[DeviceRow], mode: str
) -> ImportOut:
    keys: dict[str, str] = {}
    try:
        with caller.scope(conn, write=True):
            for row in rows:
                if row.error is None and row.device_id in RESERVED_DEVICE_IDS:
                    row.error = f"device id {row.device_id!r} is reserved by the API; choose another"
            candidates = [r.device_id for r in rows if r.error is None]
            taken = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM devices WHERE tenant_id = %s AND id = ANY(%s)", (tenant, candidates)
                ).fetchall()
            }
            for row in rows:
                if row.error is None and row.device_id in taken:
                    row.error = f"device {row.device_id!r} already exists in tenant {tenant!r}"
            good = [r for r in rows if r.error is None]
            if mode == "all_or_nothing" and len(good) < len(rows):
                raise _Rejected
            if good:
                device_quota_guard(conn, tenant, len(good))
            for row in good:
                try:
                    device, keys[row.device_id] = create_device(
                        conn, tenant, row.device_id, row.name, row.device_type, metadata=row.metadata, at_broker=False
                    )
                except RegistryError as exc:  # registered concurrently since the check above
                    row.error = str(exc)
                    if mode == "all_or_nothing":
                        raise _Rejected from None
                    continue
                audit.record(
                    conn,
                    caller,
                    tenant,
                    "device.create",
                    "device",
                    device.id,
                    {
                        "name": device.name,
                        "device_type": device.device_type,
                        "metadata": device.metadata,
                        "via": "import",
                    },
                )
            audit.record(
                conn,
                caller,
                tenant,
                "device.import",
                "tenant",
                tenant,
                {"mode": mode, "rows": len(rows), "accepted": sorted(keys), "rejected": len(rows) - len(keys)},
            )
    except _Rejected:
        results = [_row_out(r, None, None) for r in rows]
        raise Problem(
            422,
            f"{sum(r.error is not None for r in rows)} of {len(rows)} rows were rejected and mode is all_or_nothing: "
            "nothing was registered; fix the rows listed in results and import the file again",
            results=[r.model_dump() for r in results],
        ) from None
    states: dict[str, BrokerUpdate] = {}
    if keys:
        broker = _broker(settings)
        try:
            with broker.session() if broker.enabled else nullcontext():
                for device_id, key in keys.items():
                    states[device_id] = broker_provision(tenant, device_id, key, broker)
        except DynsecError as exc:  # the session could not even open: every device is registered, none provisioned
            log.warning("device import into %s: the MQTT broker is unreachable (%s)", tenant, exc)
            states = {d: states.get(d, BrokerUpdate.FAILED) for d in keys}
    results = [_row_out(r, keys.get(r.device_id) if r.error is None else None, states) for r in rows]
    return ImportOut(
        tenant_id=tenant,
        mode=mode,  # type: ignore[arg-type]
        rows=len(rows),
        accepted=len(keys),
        rejected=len(rows) - len(keys),
        results=results,
    )


def _row_out(row: DeviceRow, key: str | None, states: dict[str, BrokerUpdate] | None) -> ImportRowOut:
    if row.error is None and key is None:  # a good row of an all-or-nothing import that was refused
        return ImportRowOut(line=row.line, id=row.device_id, status="valid")
    if row.error is not None or key is None:
        return ImportRowOut(line=row.line, id=row.device_id, status="rejected", reason=row.error)
    state = (states or {}).get(row.device_id)
    return ImportRowOut(
        line=row.line, id=row.device_id, status="accepted", device_key=key, broker=state.value if state else None
    )


@router.get("/{device_id}", response_model=DeviceOut)
def read_device(device_id: str, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> DeviceOut:
    """One device (never its key)."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        device = get_device(conn, tenant, device_id)
    if device is None:
        raise _not_found(device_id, tenant)
    return DeviceOut.of(device)


@router.patch("/{device_id}", response_model=DeviceOut)
def change_device(
    device_id: str, body: DevicePatch, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None
) -> DeviceOut:
    """Change a device's name, type or metadata (merged; a key set to null is removed). The key is not touched."""
    tenant = caller.tenant(tenant_id)
    given = body.model_fields_set
    if not given:
        raise Problem(422, "nothing to change: send name, device_type and/or metadata")
    if "metadata" in given and body.metadata is None:
        raise Problem(422, "metadata must be an object: its keys are merged, and a key set to null is removed")
    changes: dict[str, Any] = {}
    if "name" in given:
        changes["name"] = body.name
    if "device_type" in given:
        changes["device_type"] = body.device_type
    try:
        with caller.scope(conn, write=True):
            before, after = update_device(
                conn, tenant, device_id, metadata=body.metadata if "metadata" in given else None, **changes
            )
            detail = {
                field: {"from": getattr(before, field), "to": getattr(after, field)}
                for field in ("name", "device_type", "metadata")
                if getattr(before, field) != getattr(after, field)
            }
            audit.record(conn, caller, tenant, "device.update", "device", device_id, detail)
    except UnknownDevice:
        raise _not_found(device_id, tenant) from None
    except RegistryError as exc:
        raise Problem(422, str(exc)) from None
    return DeviceOut.of(after)


T = TypeVar("T")


def _change_device(
    conn: psycopg.Connection, caller: Caller, tenant: str, device_id: str, action: str, change: Callable[[], T]
) -> T:
    """Apply a registry change to one device under row-level security, audited in the same transaction;
    a 404 problem for a device the tenant does not have."""
    try:
        with caller.scope(conn, write=True):
            result = change()
            audit.record(conn, caller, tenant, action, "device", device_id)
    except UnknownDevice:
        raise _not_found(device_id, tenant) from None
    return result


@router.delete("/{device_id}", status_code=204)
def remove_device(
    device_id: str, caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> Response:
    """Delete a device: its key, profile and status go, and its MQTT identity; its telemetry stays."""
    tenant = caller.tenant(tenant_id)
    _change_device(
        conn,
        caller,
        tenant,
        device_id,
        "device.delete",
        lambda: delete_device(conn, tenant, device_id, at_broker=False),
    )
    broker_delete(tenant, device_id, _broker(settings))
    return Response(status_code=204)


@router.post(
    "/{device_id}/rotate-key",
    response_model=DeviceKeyOut,
    responses={503: {"description": "The MQTT broker did not take the new key; nothing changed, retry"}},
)
def rotate_key(
    device_id: str,
    caller: Writer,
    conn: ConnDep,
    settings: SettingsDep,
    response: Response,
    tenant_id: TenantParam = None,
) -> DeviceKeyOut:
    """Issue a new key (shown this once); the old one stops working at once, over HTTP and MQTT.

    Also brings a revoked device back. The broker takes the new key before it counts: if it cannot,
    nothing changes (503).
    """
    tenant = caller.tenant(tenant_id)
    broker = _broker(settings)
    try:
        key = _change_device(
            conn,
            caller,
            tenant,
            device_id,
            "device.rotate_key",
            lambda: rotate_device_key(conn, tenant, device_id, broker=broker),
        )
    except DynsecError as exc:
        raise Problem(
            503,
            f"the MQTT broker did not take the new key ({exc}); nothing changed: retry",
            headers={"Retry-After": "5"},
        ) from None
    response.headers["Cache-Control"] = "no-store"
    return DeviceKeyOut(
        tenant_id=tenant,
        device_id=device_id,
        device_key=key,
        mqtt_username=device_username(tenant, device_id),
        broker=(BrokerUpdate.APPLIED if broker.enabled else BrokerUpdate.SKIPPED).value,
    )


@router.post("/{device_id}/revoke-key", response_model=RevokedOut)
def revoke_key(
    device_id: str, caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> RevokedOut:
    """Revoke the device's key: HTTP ingest and the broker refuse it until POST .../rotate-key issues a new one."""
    tenant = caller.tenant(tenant_id)
    _change_device(
        conn,
        caller,
        tenant,
        device_id,
        "device.revoke_key",
        lambda: revoke_device_key(conn, tenant, device_id, at_broker=False),
    )
    state = broker_revoke(tenant, device_id, _broker(settings))
    return RevokedOut(tenant_id=tenant, device_id=device_id, broker=state.value)
