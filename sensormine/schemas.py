"""Device schemas: versioned JSON Schemas of each device type's payload, per tenant.

A schema describes the device payload `{"ts": ..., "values": {"<metric>": <number>, ...}}`;
the bounds a metric declares (`properties.values.properties.<metric>.minimum` / `maximum`,
and `exclusiveMinimum` / `exclusiveMaximum`) are what the lake's data-quality checks hold
readings to. A device follows the latest version of its `devices.device_type`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

# Serialises version allocation per tenant and device type (see register_schema).
_SCHEMA_LOCK = 7_351_201

MetricRange = tuple[float | None, float | None]
"""Inclusive (min, max) of one metric's values; None where the schema sets no bound."""

MetricRanges = dict[str, dict[str, MetricRange]]
"""Ranges by device id, then metric."""


class SchemaError(ValueError):
    """A schema request that cannot be honoured (not a JSON object, bad bound, unknown tenant)."""


def _number(value: object) -> float | None:
    """A JSON number as a float; None for anything else (booleans, integers beyond float range)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _metric_properties(definition: Mapping[str, Any]) -> Mapping[str, Any]:
    """`properties.values.properties` of a schema, or {} where the schema does not spell it out."""
    node: Any = definition
    for key in ("properties", "values", "properties"):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _check_bounds(definition: Mapping[str, Any]) -> None:
    """Refuse bounds that are not numbers, which would make the metric's range meaningless."""
    for metric, spec in _metric_properties(definition).items():
        if not isinstance(spec, Mapping):
            continue
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key not in spec:
                continue
            bound = spec[key]
            # JSON Schema draft 4 spelled exclusive bounds as booleans qualifying minimum/maximum.
            if key.startswith("exclusive") and isinstance(bound, bool):
                continue
            number = _number(bound)
            if number is None or not math.isfinite(number):
                raise SchemaError(f"properties.values.properties.{metric}.{key} must be a finite number, got {bound!r}")


def register_schema(conn: psycopg.Connection, tenant_id: str, device_type: str, definition: Any) -> int:
    """Store `definition` as the next version of the tenant's device type schema; returns that version.

    Versions start at 1. The definition must be a JSON object (a JSON Schema of the payload) and
    any metric bounds it declares must be numbers. Concurrent registrations of the same type get
    consecutive versions.
    """
    if not isinstance(definition, Mapping):
        raise SchemaError(f"a schema definition must be a JSON object, got {type(definition).__name__}")
    if not isinstance(device_type, str) or not device_type.strip() or len(device_type) > 128:
        raise SchemaError("device type must be a non-empty name of at most 128 characters")
    _check_bounds(definition)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SCHEMA_LOCK, f"{tenant_id}/{device_type}"))
            row = conn.execute(
                "INSERT INTO device_schemas (tenant_id, device_type, version, definition) "
                "SELECT %(tenant)s, %(type)s, coalesce(max(version), 0) + 1, %(definition)s FROM device_schemas "
                "WHERE tenant_id = %(tenant)s AND device_type = %(type)s RETURNING version",
                {"tenant": tenant_id, "type": device_type, "definition": Jsonb(dict(definition))},
            ).fetchone()
    except psycopg.errors.ForeignKeyViolation:
        raise SchemaError(f"tenant {tenant_id!r} does not exist") from None
    assert row is not None
    return int(row[0])


def latest_schema(conn: psycopg.Connection, tenant_id: str, device_type: str) -> tuple[int, dict[str, Any]] | None:
    """(version, definition) of the newest schema of a tenant's device type, or None."""
    row = conn.execute(
        "SELECT version, definition FROM device_schemas WHERE tenant_id = %s AND device_type = %s "
        "ORDER BY version DESC LIMIT 1",
        (tenant_id, device_type),
    ).fetchone()
    return (int(row[0]), row[1]) if row else None


def _lower(spec: Mapping[str, Any]) -> float | None:
    """The inclusive lower bound of one metric's spec, or None."""
    bounds: list[float] = []
    minimum, exclusive = _number(spec.get("minimum")), spec.get("exclusiveMinimum")
    if minimum is not None:
        # A value above x is a value at or above the next float after x: exact for float64 readings.
        bounds.append(math.nextafter(minimum, math.inf) if exclusive is True else minimum)
    if (strict := _number(exclusive)) is not None:
        bounds.append(math.nextafter(strict, math.inf))
    return max(bounds) if bounds else None


def _upper(spec: Mapping[str, Any]) -> float | None:
    """The inclusive upper bound of one metric's spec, or None."""
    bounds: list[float] = []
    maximum, exclusive = _number(spec.get("maximum")), spec.get("exclusiveMaximum")
    if maximum is not None:
        bounds.append(math.nextafter(maximum, -math.inf) if exclusive is True else maximum)
    if (strict := _number(exclusive)) is not None:
        bounds.append(math.nextafter(strict, -math.inf))
    return min(bounds) if bounds else None


def schema_ranges(definition: Mapping[str, Any]) -> dict[str, MetricRange]:
    """Inclusive (min, max) of every metric a schema declares ((None, None) when it sets no bound).

    Exclusive bounds become the nearest float inside them, which is exact for float64 values.
    """
    return {
        metric: (_lower(spec), _upper(spec))
        for metric, spec in _metric_properties(definition).items()
        if isinstance(spec, Mapping)
    }


def metric_ranges(conn: psycopg.Connection, tenant_id: str) -> MetricRanges:
    """Value ranges of each of the tenant's devices, from the latest schema of its device type.

    Devices without a type, or whose type has no schema, are left out: nothing bounds them.
    """
    rows = conn.execute(
        "SELECT d.id, s.definition FROM devices d "
        "JOIN LATERAL (SELECT definition FROM device_schemas s WHERE s.tenant_id = d.tenant_id "
        "  AND s.device_type = d.device_type ORDER BY s.version DESC LIMIT 1) s ON true "
        "WHERE d.tenant_id = %s ORDER BY d.id",
        (tenant_id,),
    ).fetchall()
    return {device_id: schema_ranges(definition) for device_id, definition in rows}
