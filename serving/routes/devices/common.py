"""What the device routes share: permissions, the tenant parameter, the device model, the broker client."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query, Security
from pydantic import BaseModel, Field

from sensormine.clients.dynsec import Dynsec
from sensormine.devices.registry import Device
from sensormine.settings import Settings
from serving.deps import Caller, authenticate
from serving.problems import Problem

TenantParam = Annotated[str | None, Query(description="A sub-tenant; the key's own tenant by default")]
Reader = Annotated[Caller, Security(authenticate, scopes=["devices:read"])]
Writer = Annotated[Caller, Security(authenticate, scopes=["devices:write"])]

BrokerState = Annotated[
    Literal["applied", "skipped", "failed"],
    Field(
        description="The MQTT broker's side: applied; skipped (the broker has no per-device identities); "
        "failed (logged: the key works over HTTP; rotate it to use MQTT)"
    ),
]


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


def broker(settings: Settings) -> Dynsec:
    """The MQTT broker's dynamic-security client for the app's settings."""
    return Dynsec(settings)


def not_found(device_id: str, tenant: str) -> Problem:
    """The 404 for a device the tenant does not have."""
    return Problem(
        404, f"device {device_id!r} not found in tenant {tenant!r}; GET /api/devices lists the registered ones"
    )
