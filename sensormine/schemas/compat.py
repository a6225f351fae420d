"""Schema definitions: what a valid one is, and which changes a new version may make."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError as JsonSchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from sensormine.schemas.ranges import json_number, metric_properties, schema_child, schema_ranges
from sensormine.telemetry.payload import escape_pointer


class SchemaError(ValueError):
    """A schema request that cannot be honoured (not a JSON object, bad bound, unknown tenant)."""


class IncompatibleSchema(SchemaError):
    """A new schema version that would break what the previous one promised; `problems` lists why."""

    def __init__(self, device_type: str, previous: int, problems: list[str]) -> None:
        super().__init__(
            f"version {previous + 1} of {device_type!r} is incompatible with version {previous}: "
            + "; ".join(problems)
            + " (register with force to accept the break)"
        )
        self.previous = previous
        self.problems = problems


def _check_bounds(definition: Mapping[str, Any]) -> None:
    """Refuse bounds that are not numbers, which would make the metric's range meaningless."""
    for metric, spec in metric_properties(definition).items():
        if not isinstance(spec, Mapping):
            continue
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key not in spec:
                continue
            bound = spec[key]
            # JSON Schema draft 4 spelled exclusive bounds as booleans qualifying minimum/maximum.
            if key.startswith("exclusive") and isinstance(bound, bool):
                continue
            number = json_number(bound)
            if number is None or not math.isfinite(number):
                raise SchemaError(f"properties.values.properties.{metric}.{key} must be a finite number, got {bound!r}")


def validator_class(definition: Mapping[str, Any]) -> type[Validator]:
    """The jsonschema validator class of a definition: its `$schema` draft, 2020-12 when it names none."""
    cls: type[Validator] = validator_for(definition, default=Draft202012Validator)
    return cls


def check_definition(definition: Any) -> None:
    """Raise SchemaError unless `definition` is a JSON object and a valid JSON Schema with numeric bounds."""
    if not isinstance(definition, Mapping):
        raise SchemaError(f"a schema definition must be a JSON object, got {type(definition).__name__}")
    _check_bounds(definition)
    try:
        validator_class(definition).check_schema(definition)
    except JsonSchemaError as exc:
        where = "/" + "/".join(escape_pointer(str(p)) for p in exc.absolute_path)
        raise SchemaError(f"not a valid JSON Schema at {where}: {exc.message}") from None


def _types(spec: Any) -> frozenset[str] | None:
    """The `type` keyword of a property as a set; None when it does not constrain the type."""
    declared = spec.get("type") if isinstance(spec, Mapping) else None
    if isinstance(declared, str):
        return frozenset([declared])
    if isinstance(declared, list):
        return frozenset(t for t in declared if isinstance(t, str))
    return None


def _show_types(types: frozenset[str] | None) -> str:
    return "any" if types is None else "|".join(sorted(types))


def _required(node: Any) -> set[str]:
    names = node.get("required") if isinstance(node, Mapping) else None
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _compare_level(old: Any, new: Any, where: str, problems: list[str], always_present: frozenset[str]) -> None:
    """Removed properties, changed types and newly required names of one object level.

    Requiring a name in `always_present` changes nothing (every payload item has `ts` and `values`).
    """
    old_props, new_props = schema_child(old, "properties"), schema_child(new, "properties")
    old_props = old_props if isinstance(old_props, Mapping) else {}
    new_props = new_props if isinstance(new_props, Mapping) else {}
    for name, spec in old_props.items():
        pointer = f"{where}/properties/{escape_pointer(name)}"
        if name not in new_props:
            problems.append(f"removes {pointer}")
            continue
        before, after = _types(spec), _types(new_props[name])
        if before != after:
            problems.append(f"changes the type of {pointer} from {_show_types(before)} to {_show_types(after)}")
    if added := _required(new) - _required(old) - always_present:
        problems.append(f"newly requires {', '.join(sorted(added))} in {where}/required")


def _show_range(lo: float | None, hi: float | None) -> str:
    return f"[{'-inf' if lo is None else f'{lo:g}'}, {'+inf' if hi is None else f'{hi:g}'}]"


def compatibility_problems(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why `new` would break readers or devices that rely on `old`; empty when it is a compatible successor.

    Compared at the payload level (`properties`, `required`, `type`) and at the metrics level
    (`properties.values`): a removed property, a changed `type` (compared as a set; adding or dropping
    the keyword changes it too) and a newly required name are breaking; so is a metric range that
    shrinks (a bound raised, lowered, or added where there was none), since payloads the previous
    version accepted would start to bounce. Added optional properties, widened or dropped bounds are
    fine. Other keywords (enum, pattern, additionalProperties, ...) are not compared.
    """
    problems: list[str] = []
    if _types(old) != _types(new):
        problems.append(
            f"changes the type of the payload from {_show_types(_types(old))} to {_show_types(_types(new))}"
        )
    _compare_level(old, new, "", problems, frozenset({"ts", "values"}))
    old_values, new_values = schema_child(old, "properties", "values"), schema_child(new, "properties", "values")
    _compare_level(old_values, new_values, "/properties/values", problems, frozenset())
    before, after = schema_ranges(old), schema_ranges(new)
    for metric in sorted(before.keys() & after.keys()):
        (lo0, hi0), (lo1, hi1) = before[metric], after[metric]
        narrower = (lo1 is not None and (lo0 is None or lo1 > lo0)) or (hi1 is not None and (hi0 is None or hi1 < hi0))
        if narrower:
            problems.append(f"narrows the range of {metric} from {_show_range(lo0, hi0)} to {_show_range(lo1, hi1)}")
    return problems
