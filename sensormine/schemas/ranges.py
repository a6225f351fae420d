"""The minimum/maximum per metric a device's latest schema declares (the lake's range check uses them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import psycopg


def json_number(value: object) -> float | None:
    """A JSON number as a float; None for anything else (booleans, integers beyond float range)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def schema_child(node: Any, *keys: str) -> Any:
    """`node[k1][k2]...`, or None where a level is missing or not an object."""
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def metric_properties(definition: Mapping[str, Any]) -> Mapping[str, Any]:
    """`properties.values.properties` of a schema, or {} where the schema does not spell it out."""
    node = schema_child(definition, "properties", "values", "properties")
    return node if isinstance(node, Mapping) else {}


MetricRange = tuple[float | None, float | None]
"""Inclusive (min, max) of one metric's values; None where the schema sets no bound."""


MetricRanges = dict[str, dict[str, MetricRange]]
"""Ranges by device id, then metric."""


def _lower(spec: Mapping[str, Any]) -> float | None:
    """The inclusive lower bound of one metric's spec, or None."""
    bounds: list[float] = []
    minimum, exclusive = json_number(spec.get("minimum")), spec.get("exclusiveMinimum")
    if minimum is not None:
        # A value above x is a value at or above the next float after x: exact for float64 readings.
        bounds.append(math.nextafter(minimum, math.inf) if exclusive is True else minimum)
    if (strict := json_number(exclusive)) is not None:
        bounds.append(math.nextafter(strict, math.inf))
    return max(bounds) if bounds else None


def _upper(spec: Mapping[str, Any]) -> float | None:
    """The inclusive upper bound of one metric's spec, or None."""
    bounds: list[float] = []
    maximum, exclusive = json_number(spec.get("maximum")), spec.get("exclusiveMaximum")
    if maximum is not None:
        bounds.append(math.nextafter(maximum, -math.inf) if exclusive is True else maximum)
    if (strict := json_number(exclusive)) is not None:
        bounds.append(math.nextafter(strict, -math.inf))
    return min(bounds) if bounds else None


def schema_ranges(definition: Mapping[str, Any]) -> dict[str, MetricRange]:
    """Inclusive (min, max) of every metric a schema declares ((None, None) when it sets no bound).

    Exclusive bounds become the nearest float inside them, which is exact for float64 values.
    """
    return {
        metric: (_lower(spec), _upper(spec))
        for metric, spec in metric_properties(definition).items()
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
