"""Versioned device schemas in PostgreSQL: register (refusing incompatible versions unless forced), read, delete."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sensormine.schemas.compat import IncompatibleSchema, SchemaError, check_definition, compatibility_problems

log = logging.getLogger(__name__)


# Serialises version allocation per tenant and device type (see register_schema).
_SCHEMA_LOCK = 7_351_201


@dataclass(frozen=True)
class SchemaVersion:
    """One stored version of a tenant's device type schema."""

    tenant_id: str
    device_type: str
    version: int
    definition: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Registered:
    """A registered version; `problems` lists the breaks a forced registration accepted (empty otherwise)."""

    version: SchemaVersion
    problems: list[str]


class SchemaInUse(SchemaError):
    """A device type's schemas cannot be deleted while devices of that type exist."""

    def __init__(self, tenant_id: str, device_type: str, devices: int, examples: list[str]) -> None:
        super().__init__(
            f"{devices} device(s) of tenant {tenant_id!r} have type {device_type!r} (e.g. {', '.join(examples)}): "
            "change their device_type (PATCH /api/devices/{id}) or delete them before deleting the schemas"
        )
        self.devices = devices
        self.examples = examples


_VERSION_COLUMNS = "tenant_id, device_type, version, definition, created_at"


def register_schema(
    conn: psycopg.Connection, tenant_id: str, device_type: str, definition: Any, *, force: bool = False
) -> int:
    """Store `definition` as the next version of the tenant's device type schema; returns that version.

    Versions start at 1. The definition must be a JSON object, a valid JSON Schema (of the draft its
    `$schema` names, 2020-12 by default) whose metric bounds are numbers. Unless `force`, it must be
    compatible with the latest version (see `compatibility_problems`): IncompatibleSchema otherwise.
    Concurrent registrations of the same type get consecutive versions.
    """
    return register_schema_version(conn, tenant_id, device_type, definition, force=force).version.version


def register_schema_version(
    conn: psycopg.Connection, tenant_id: str, device_type: str, definition: Any, *, force: bool = False
) -> Registered:
    """`register_schema`, returning the stored version and the breaks a forced registration accepted."""
    if not isinstance(device_type, str) or not device_type.strip() or len(device_type) > 128:
        raise SchemaError("device type must be a non-empty name of at most 128 characters")
    check_definition(definition)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SCHEMA_LOCK, f"{tenant_id}/{device_type}"))
            latest = latest_schema(conn, tenant_id, device_type)
            problems = compatibility_problems(latest[1], definition) if latest else []
            if latest and problems and not force:
                raise IncompatibleSchema(device_type, latest[0], problems)
            row = conn.execute(
                "INSERT INTO device_schemas (tenant_id, device_type, version, definition) "
                f"VALUES (%(tenant)s, %(type)s, %(version)s, %(definition)s) RETURNING {_VERSION_COLUMNS}",
                {
                    "tenant": tenant_id,
                    "type": device_type,
                    "version": (latest[0] if latest else 0) + 1,
                    "definition": Jsonb(dict(definition)),
                },
            ).fetchone()
    except psycopg.errors.ForeignKeyViolation:
        raise SchemaError(f"tenant {tenant_id!r} does not exist") from None
    assert row is not None
    stored = SchemaVersion(row[0], row[1], int(row[2]), row[3], row[4])
    if problems:
        log.warning(
            "forced incompatible schema %s/%s v%d: %s", tenant_id, device_type, stored.version, "; ".join(problems)
        )
    return Registered(stored, problems)


def check_compatibility(
    conn: psycopg.Connection, tenant_id: str, device_type: str, definition: Any
) -> tuple[int | None, list[str]]:
    """(latest version or None, problems) of registering `definition` now; SchemaError when it is no valid schema.

    Nothing is stored: this is the check `register_schema` makes, for a candidate.
    """
    check_definition(definition)
    latest = latest_schema(conn, tenant_id, device_type)
    if latest is None:
        return None, []
    return latest[0], compatibility_problems(latest[1], definition)


def get_schema(
    conn: psycopg.Connection, tenant_id: str, device_type: str, version: int | None = None
) -> SchemaVersion | None:
    """One version of a tenant's device type schema (the latest when `version` is None), or None."""
    row = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM device_schemas WHERE tenant_id = %s AND device_type = %s "
        "AND (%s::int IS NULL OR version = %s) ORDER BY version DESC LIMIT 1",
        (tenant_id, device_type, version, version),
    ).fetchone()
    return SchemaVersion(row[0], row[1], int(row[2]), row[3], row[4]) if row else None


def page_schema_versions(
    conn: psycopg.Connection, tenant_id: str, device_type: str, *, after: int | None = None, limit: int = 100
) -> list[SchemaVersion]:
    """Up to `limit` versions of a device type's schema in ascending order, after version `after`."""
    rows = conn.execute(
        f"SELECT {_VERSION_COLUMNS} FROM device_schemas WHERE tenant_id = %s AND device_type = %s "
        "AND version > %s ORDER BY version LIMIT %s",
        (tenant_id, device_type, after or 0, limit),
    ).fetchall()
    return [SchemaVersion(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows]


@dataclass(frozen=True)
class DeviceTypeSchemas:
    """A device type of a tenant that has schemas: its latest version and how many devices follow it."""

    tenant_id: str
    device_type: str
    latest_version: int
    versions: int
    updated_at: datetime  # when the latest version was registered
    devices: int


def page_device_types(
    conn: psycopg.Connection, tenant_id: str, *, after: str | None = None, limit: int = 100
) -> list[DeviceTypeSchemas]:
    """Up to `limit` device types of a tenant that have schemas, by name, after the name `after`."""
    rows = conn.execute(
        "SELECT s.tenant_id, s.device_type, max(s.version), count(*), max(s.created_at), "
        "  (SELECT count(*) FROM devices d WHERE d.tenant_id = s.tenant_id AND d.device_type = s.device_type) "
        "FROM device_schemas s WHERE s.tenant_id = %s AND (%s::text IS NULL OR s.device_type > %s) "
        "GROUP BY s.tenant_id, s.device_type ORDER BY s.device_type LIMIT %s",
        (tenant_id, after, after, limit),
    ).fetchall()
    return [DeviceTypeSchemas(r[0], r[1], int(r[2]), int(r[3]), r[4], int(r[5])) for r in rows]


def delete_schemas(conn: psycopg.Connection, tenant_id: str, device_type: str) -> int:
    """Delete every version of a device type's schema; returns how many. SchemaInUse while devices have the type.

    Versions are never rewritten, so a single version cannot be deleted: to undo a version, register
    its predecessor's definition again as a new one. After a deletion, registering starts at version 1.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SCHEMA_LOCK, f"{tenant_id}/{device_type}"))
        users = conn.execute(
            "SELECT id, count(*) OVER () FROM devices WHERE tenant_id = %s AND device_type = %s ORDER BY id LIMIT 5",
            (tenant_id, device_type),
        ).fetchall()
        if users:
            raise SchemaInUse(tenant_id, device_type, int(users[0][1]), [u[0] for u in users])
        cur = conn.execute(
            "DELETE FROM device_schemas WHERE tenant_id = %s AND device_type = %s", (tenant_id, device_type)
        )
    return cur.rowcount


def latest_schema(conn: psycopg.Connection, tenant_id: str, device_type: str) -> tuple[int, dict[str, Any]] | None:
    """(version, definition) of the newest schema of a tenant's device type, or None."""
    row = conn.execute(
        "SELECT version, definition FROM device_schemas WHERE tenant_id = %s AND device_type = %s "
        "ORDER BY version DESC LIMIT 1",
        (tenant_id, device_type),
    ).fetchone()
    return (int(row[0]), row[1]) if row else None
