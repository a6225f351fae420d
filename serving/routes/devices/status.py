"""Device status (what the ingest paths saw) and OPC UA / Modbus connection profiles."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Response
from pydantic import BaseModel

from sensormine.devices.profiles import ProfileError, delete_profile, get_profile, set_profile
from sensormine.devices.status import device_statuses
from serving.deps import ConnDep, SettingsDep
from serving.problems import Problem
from serving.routes.devices.common import Reader, TenantParam, Writer

router = APIRouter(prefix="/api/devices", tags=["devices"])


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


@router.get("/status", response_model=list[DeviceStatusOut])
def list_status(
    caller: Reader, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> list[DeviceStatusOut]:
    """Status of every device of a tenant: online (heard from within the offline timeout), counters."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        rows = device_statuses(conn, [tenant], settings.device_offline_after_s)
    return [DeviceStatusOut(**vars(s)) for s in rows]


@router.get("/{device_id}/status", response_model=DeviceStatusOut)
def one_status(
    device_id: str, caller: Reader, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> DeviceStatusOut:
    """Status of one device."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        rows = device_statuses(conn, [tenant], settings.device_offline_after_s, [device_id])
    if not rows:
        raise Problem(404, f"device {device_id!r} not found in tenant {tenant!r}")
    return DeviceStatusOut(**vars(rows[0]))


@router.get("/{device_id}/profile", response_model=ProfileOut)
def read_profile(device_id: str, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> ProfileOut:
    """The device's OPC UA or Modbus connection profile."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
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
        with caller.scope(conn, write=True):
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
    with caller.scope(conn, write=True):
        removed = delete_profile(conn, tenant, device_id)
    if not removed:
        raise Problem(404, f"device {device_id!r} of tenant {tenant!r} has no profile")
    return Response(status_code=204)
