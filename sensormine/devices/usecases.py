"""Device use cases: the whole job of each change, shared by the REST API and the `sensormine` command line.

Each runs under row-level security for the acting identity, checks what the domain and the plan
demand, writes, records the audit entry in the same transaction, and then brings the MQTT broker
in line (after the commit, so a rolled-back change leaves nothing at the broker; a key rotation is
the exception: the broker takes the new key before it counts). Callers only parse and authorise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import psycopg

from sensormine.audit import log as audit
from sensormine.clients.dynsec import Dynsec, DynsecError
from sensormine.devices.csv_import import DeviceRow
from sensormine.devices.registry import (
    BrokerUpdate,
    Device,
    RegistryError,
    broker_delete,
    broker_provision,
    broker_revoke,
    create_device,
    delete_device,
    revoke_device_key,
    rotate_device_key,
    update_device,
)
from sensormine.limits.devices import DeviceQuota, check_device_quota

log = logging.getLogger(__name__)

RESERVED_DEVICE_IDS = frozenset({"status", "import"})
"""Path segments of /api/devices that a device id would shadow: refused as ids everywhere."""

ImportMode = Literal["per_row", "all_or_nothing"]
T = TypeVar("T")


def check_new_device_id(device_id: str) -> None:
    """Refuse ids the API could not address (RegistryError)."""
    if device_id in RESERVED_DEVICE_IDS:
        raise RegistryError(
            f"device id {device_id!r} is reserved by the API (/api/devices/{device_id}); choose another"
        )


def _quota(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, adding: int, beyond_quota: bool
) -> DeviceQuota | None:
    """The plan's device quota for `adding` devices (QuotaExceeded beyond it), unless an operator overrides it."""
    if beyond_quota:
        if not actor.is_platform:
            raise PermissionError("only a platform operator may register devices beyond the plan's quota")
        return None
    return check_device_quota(conn, tenant_id, adding)


def _created_detail(device: Device, **extra: Any) -> dict[str, Any]:
    return {"name": device.name, "device_type": device.device_type, "metadata": device.metadata, **extra}


@dataclass(frozen=True)
class DeviceRegistration:
    """A registered device with its key (shown once) and what the broker made of it."""

    device: Device
    key: str
    broker: BrokerUpdate


def register_device(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    device_id: str,
    name: str | None = None,
    device_type: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    broker: Dynsec | None = None,
    beyond_quota: bool = False,
) -> DeviceRegistration:
    """Register a device: id checks, the plan's device quota, the row and its audit entry, then the broker.

    Raises RegistryError (bad or reserved id, name, type, metadata), DuplicateDevice, UnknownTenant,
    QuotaExceeded (the quota group is full). `beyond_quota` (operators only) skips the quota and is
    recorded in the audit entry.
    """
    check_new_device_id(device_id)
    with actor.scope(conn, write=True):
        _quota(conn, actor, tenant_id, 1, beyond_quota)
        device, key = create_device(
            conn, tenant_id, device_id, name, device_type, metadata=dict(metadata or {}), at_broker=False
        )
        detail = _created_detail(device, **({"beyond_quota": True} if beyond_quota else {}))
        audit.record(conn, actor, tenant_id, "device.create", "device", device.id, detail)
    return DeviceRegistration(device, key, broker_provision(tenant_id, device.id, key, broker))


def _audited(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    device_id: str,
    action: str,
    change: Callable[[], T],
    detail: Callable[[T], dict[str, Any]] | None = None,
) -> T:
    """Apply one registry change under row-level security, audited in the same transaction."""
    with actor.scope(conn, write=True):
        result = change()
        audit.record(conn, actor, tenant_id, action, "device", device_id, detail(result) if detail else None)
    return result


def change_device(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    device_id: str,
    changes: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Device:
    """Change a device's name and/or type (`changes`) and merge `metadata` into its labels; audits what differs.

    Raises UnknownDevice, RegistryError.
    """

    def diff(pair: tuple[Device, Device]) -> dict[str, Any]:
        before, after = pair
        return {
            f: {"from": getattr(before, f), "to": getattr(after, f)}
            for f in ("name", "device_type", "metadata")
            if getattr(before, f) != getattr(after, f)
        }

    _, after = _audited(
        conn,
        actor,
        tenant_id,
        device_id,
        "device.update",
        lambda: update_device(conn, tenant_id, device_id, metadata=dict(metadata) if metadata else None, **changes),
        diff,
    )
    return after


def rotate_key(conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, device_id: str, broker: Dynsec) -> str:
    """Issue a new device key (returned once); the broker takes it before it counts (DynsecError: nothing changed).

    Also brings a revoked device back. Raises UnknownDevice.
    """
    return _audited(
        conn,
        actor,
        tenant_id,
        device_id,
        "device.rotate_key",
        lambda: rotate_device_key(conn, tenant_id, device_id, broker=broker),
    )


def revoke_key(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, device_id: str, broker: Dynsec | None = None
) -> BrokerUpdate:
    """Revoke a device's key (HTTP and MQTT) until a rotation; the device stays. Raises UnknownDevice."""
    _audited(
        conn,
        actor,
        tenant_id,
        device_id,
        "device.revoke_key",
        lambda: revoke_device_key(conn, tenant_id, device_id, at_broker=False),
    )
    return broker_revoke(tenant_id, device_id, broker)


def remove_device(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, device_id: str, broker: Dynsec | None = None
) -> BrokerUpdate:
    """Delete a device with its key, profile and status, and its MQTT identity; its telemetry stays."""
    _audited(
        conn,
        actor,
        tenant_id,
        device_id,
        "device.delete",
        lambda: delete_device(conn, tenant_id, device_id, at_broker=False),
    )
    return broker_delete(tenant_id, device_id, broker)


class ImportRefused(RegistryError):
    """An all-or-nothing import with a rejected row: nothing was registered; `rows` say which and why."""

    def __init__(self, rows: list[DeviceRow]) -> None:
        bad = sum(r.error is not None for r in rows)
        super().__init__(
            f"{bad} of {len(rows)} rows were rejected and mode is all_or_nothing: nothing was registered; "
            "fix the rows listed in results and import the file again"
        )
        self.rows = rows


@dataclass
class DeviceImport:
    """What an import did: each row's error (None: registered), the keys issued (shown once), broker states."""

    rows: list[DeviceRow]
    keys: dict[str, str] = field(default_factory=dict)
    broker: dict[str, BrokerUpdate] = field(default_factory=dict)


def import_devices(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    rows: list[DeviceRow],
    mode: ImportMode = "per_row",
    *,
    broker: Dynsec | None = None,
    beyond_quota: bool = False,
) -> DeviceImport:
    """Register parsed CSV rows: each is registered or rejected with its reason; the quota covers them all at once.

    Reserved and already registered ids are rejected rows. `all_or_nothing` raises ImportRefused when
    any row is rejected; QuotaExceeded when the good rows do not fit the plan (nothing registered).
    """
    result = DeviceImport(rows)
    with actor.scope(conn, write=True):
        for row in rows:
            if row.error is None and row.device_id in RESERVED_DEVICE_IDS:
                row.error = f"device id {row.device_id!r} is reserved by the API; choose another"
        candidates = [r.device_id for r in rows if r.error is None]
        taken = {
            r[0]
            for r in conn.execute(
                "SELECT id FROM devices WHERE tenant_id = %s AND id = ANY(%s)", (tenant_id, candidates)
            ).fetchall()
        }
        for row in rows:
            if row.error is None and row.device_id in taken:
                row.error = f"device {row.device_id!r} already exists in tenant {tenant_id!r}"
        good = [r for r in rows if r.error is None]
        if mode == "all_or_nothing" and len(good) < len(rows):
            raise ImportRefused(rows)
        if good:
            _quota(conn, actor, tenant_id, len(good), beyond_quota)
        for row in good:
            try:
                device, result.keys[row.device_id] = create_device(
                    conn, tenant_id, row.device_id, row.name, row.device_type, metadata=row.metadata, at_broker=False
                )
            except RegistryError as exc:  # registered concurrently since the check above
                row.error = str(exc)
                if mode == "all_or_nothing":
                    raise ImportRefused(rows) from None
                continue
            extra = {"via": "import", **({"beyond_quota": True} if beyond_quota else {})}
            audit.record(conn, actor, tenant_id, "device.create", "device", device.id, _created_detail(device, **extra))
        audit.record(
            conn,
            actor,
            tenant_id,
            "device.import",
            "tenant",
            tenant_id,
            {
                "mode": mode,
                "rows": len(rows),
                "accepted": sorted(result.keys),
                "rejected": len(rows) - len(result.keys),
            },
        )
    if result.keys:
        broker = broker or Dynsec()
        try:
            with broker.session() if broker.enabled else nullcontext():
                for device_id, key in result.keys.items():
                    result.broker[device_id] = broker_provision(tenant_id, device_id, key, broker)
        except DynsecError as exc:  # the session could not even open: every device is registered, none provisioned
            log.warning("device import into %s: the MQTT broker is unreachable (%s)", tenant_id, exc)
            result.broker = {d: result.broker.get(d, BrokerUpdate.FAILED) for d in result.keys}
    return result
