"""Registered devices: register, list, read, change, delete; rotate and revoke their keys."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from sensormine.clients.dynsec import DynsecError, device_username
from sensormine.devices import usecases
from sensormine.devices.registry import (
    BrokerUpdate,
    DuplicateDevice,
    RegistryError,
    UnknownDevice,
    get_device,
    page_devices,
)
from sensormine.limits.devices import QuotaExceeded
from sensormine.tenancy.tenants import UnknownTenant, visible_tenant_ids
from serving.deps import Caller, ConnDep, SettingsDep
from serving.limits import too_many
from serving.pagination import Page, PageDep
from serving.problems import Problem
from serving.routes.devices.common import BrokerState, DeviceOut, Reader, TenantParam, Writer, broker, not_found

router = APIRouter(prefix="/api/devices", tags=["devices"])


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


def _location(caller: Caller, tenant: str, device_id: str) -> str:
    return f"/api/devices/{device_id}" + ("" if tenant == caller.tenant_id else f"?tenant_id={tenant}")


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
        done = usecases.register_device(
            conn, caller, tenant, body.id, body.name, body.device_type, body.metadata, broker=broker(settings)
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
    except QuotaExceeded as exc:
        raise too_many(exc) from None
    response.headers["Location"] = _location(caller, tenant, done.device.id)
    response.headers["Cache-Control"] = "no-store"
    return DeviceCreated(
        **DeviceOut.of(done.device).model_dump(),
        device_key=done.key,
        mqtt_username=device_username(tenant, done.device.id),
        broker=done.broker.value,
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


@router.get("/{device_id}", response_model=DeviceOut)
def read_device(device_id: str, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> DeviceOut:
    """One device (never its key)."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        device = get_device(conn, tenant, device_id)
    if device is None:
        raise not_found(device_id, tenant)
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
    changes: dict[str, Any] = {f: getattr(body, f) for f in ("name", "device_type") if f in given}
    try:
        after = usecases.change_device(conn, caller, tenant, device_id, changes, body.metadata)
    except UnknownDevice:
        raise not_found(device_id, tenant) from None
    except RegistryError as exc:
        raise Problem(422, str(exc)) from None
    return DeviceOut.of(after)


@router.delete("/{device_id}", status_code=204)
def remove_device(
    device_id: str, caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> Response:
    """Delete a device: its key, profile and status go, and its MQTT identity; its telemetry stays."""
    tenant = caller.tenant(tenant_id)
    try:
        usecases.remove_device(conn, caller, tenant, device_id, broker(settings))
    except UnknownDevice:
        raise not_found(device_id, tenant) from None
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
    at_broker = broker(settings)
    try:
        key = usecases.rotate_key(conn, caller, tenant, device_id, at_broker)
    except UnknownDevice:
        raise not_found(device_id, tenant) from None
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
        broker=(BrokerUpdate.APPLIED if at_broker.enabled else BrokerUpdate.SKIPPED).value,
    )


@router.post("/{device_id}/revoke-key", response_model=RevokedOut)
def revoke_key(
    device_id: str, caller: Writer, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> RevokedOut:
    """Revoke the device's key: HTTP ingest and the broker refuse it until POST .../rotate-key issues a new one."""
    tenant = caller.tenant(tenant_id)
    try:
        state = usecases.revoke_key(conn, caller, tenant, device_id, broker(settings))
    except UnknownDevice:
        raise not_found(device_id, tenant) from None
    return RevokedOut(tenant_id=tenant, device_id=device_id, broker=state.value)
