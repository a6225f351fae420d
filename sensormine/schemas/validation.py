"""Validating readings against a device's schema: a fast checker for common schemas, jsonschema otherwise."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from jsonschema import Draft6Validator, Draft7Validator, Draft201909Validator, Draft202012Validator
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator

from sensormine.reading import US_PER_DAY, Reading, us_to_datetime
from sensormine.schemas.compat import SchemaError, check_definition, validator_class
from sensormine.telemetry.payload import PayloadError, escape_pointer, parse_reading_item
from sensormine.telemetry.payload import payload_items as sample_items

log = logging.getLogger(__name__)


Point = tuple[str, int, float, int]
"""(metric, ts in epoch µs, value, quality): one reading as the consumer sees it in an envelope."""


MAX_MESSAGE_CHARS = 300  # of a validator message in a reject reason (messages can quote whole instances)


_QUALITY_NAMES = {0: "good", 1: "uncertain", 2: "bad"}


_DAYS: dict[int, str] = {}  # epoch day -> "YYYY-MM-DD": a message's timestamps share a day or two


def _iso(ts: int) -> str:
    """`us_to_datetime(ts).isoformat()`, faster (this runs per item on the ingest path); the number
    itself when it is no representable instant."""
    day, rest = divmod(ts, US_PER_DAY)
    date = _DAYS.get(day)
    if date is None:
        try:
            date = us_to_datetime(day * US_PER_DAY).date().isoformat()
        except (ValueError, OverflowError, TypeError):
            return str(ts)
        if len(_DAYS) > 4096:
            _DAYS.clear()
        _DAYS[day] = date
    seconds, micros = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if micros:
        return f"{date}T{hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}+00:00"
    return f"{date}T{hours:02d}:{minutes:02d}:{seconds:02d}+00:00"


def payload_items(points: Iterable[Point]) -> list[dict[str, Any]]:
    """The payload items a device would have sent for these readings, in timestamp order.

    Readings sharing a timestamp and a quality form one item `{"ts": <ISO-8601 UTC>, "values": {...}}`,
    with `"quality": "uncertain" | "bad"` unless good (the payload contract's default). A metric
    repeated at the same timestamp starts another item, so every value is validated.
    """
    items = _items(points, exact=False)
    assert items is not None
    return items


def exact_payload_items(points: Any) -> list[dict[str, Any]] | None:
    """`payload_items` of an envelope's decoded `points`, or None unless every point is exactly
    `[str, int, int | float, int]` (the consumer's fast path; others take the reference path)."""
    if type(points) is not list:
        return None
    try:
        return _items(points, exact=True)
    except (TypeError, ValueError):  # a point that is not a list of four
        return None


def _items(points: Iterable[Any], exact: bool) -> list[dict[str, Any]] | None:
    groups: dict[tuple[int, int], list[dict[str, float]]] = {}
    for metric, ts, value, quality in points:
        if exact and (
            type(metric) is not str or type(ts) is not int or type(quality) is not int
            or (type(value) is not float and type(value) is not int)
        ):  # fmt: skip
            return None
        key = (ts, quality)
        group = groups.get(key)
        if group is None:
            groups[key] = [{metric: value}]
        elif metric in group[-1]:
            group.append({metric: value})
        else:
            group[-1][metric] = value
    items: list[dict[str, Any]] = []
    for (ts, quality), group in sorted(groups.items(), key=lambda kv: kv[0]):
        stamp = _iso(ts)
        for values in group:
            item: dict[str, Any] = {"ts": stamp, "values": values}
            if quality:
                item["quality"] = _QUALITY_NAMES.get(quality, quality)
            items.append(item)
    return items


@dataclass(frozen=True)
class SchemaViolation:
    """Why a message breaks its device's schema: the first failing item and jsonschema's best error."""

    device_type: str
    version: int
    pointer: str  # JSON pointer into the payload item (RFC 6901; "/" for the item itself)
    message: str
    ts: str  # the failing item's timestamp, ISO-8601

    def __str__(self) -> str:  # the DLQ reason
        return f"schema {self.device_type} v{self.version}: {self.message} (at {self.pointer}, item ts {self.ts})"


# A fast, exact checker for the keywords most payload schemas use. jsonschema stays the authority:
# it validates every schema that uses any other keyword, and explains every failure.
_Check = Callable[[Any], bool]


_FAST_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "minProperties", "maxProperties",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format",  # format: an annotation here
    }
)  # fmt: skip


_FAST_DRAFTS: tuple[type[Validator], ...] = (
    Draft6Validator,
    Draft7Validator,
    Draft201909Validator,
    Draft202012Validator,
)


def _is_type(value: Any, name: str) -> bool:
    """jsonschema's draft 6+ type semantics for the values a payload item can hold."""
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "string":
        return isinstance(value, str)
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    raise ValueError(name)


def _type_check(names: tuple[str, ...]) -> _Check:
    if names == ("number",):  # by far the most common: a metric
        return lambda v: type(v) is float or type(v) is int
    return lambda v: any(_is_type(v, n) for n in names)


def _bound_check(keyword: str, bound: float) -> _Check:
    """A numeric bound; like jsonschema, it holds for any value that is not a number (bool is not one)."""
    number = (int, float)
    if keyword == "minimum":
        return lambda v: type(v) not in number or v >= bound
    if keyword == "maximum":
        return lambda v: type(v) not in number or v <= bound
    if keyword == "exclusiveMinimum":
        return lambda v: type(v) not in number or v > bound
    return lambda v: type(v) not in number or v < bound


def _numeric_check(node: Mapping[str, Any]) -> _Check:
    """`{"type": "number"?, "minimum"?, "maximum"?, "exclusiveMinimum"?, "exclusiveMaximum"?}` as one check."""
    typed = "type" in node
    lo, hi = node.get("minimum"), node.get("maximum")
    lo_x, hi_x = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")

    def check(v: Any) -> bool:
        if type(v) is not float and type(v) is not int:
            return not typed  # bounds hold for anything that is not a number (bool is not one)
        return (
            (lo is None or v >= lo) and (hi is None or v <= hi)
            and (lo_x is None or v > lo_x) and (hi_x is None or v < hi_x)
        )  # fmt: skip

    return check


def _fast_node(node: Any, known: frozenset[str]) -> _Check | None:
    """A closure equivalent to jsonschema on `node`, or None when it uses a keyword outside the subset."""
    if node is True or node == {}:
        return lambda value: True
    if node is False:
        return lambda value: False
    if not isinstance(node, Mapping) or not (node.keys() & known) <= _FAST_KEYWORDS:
        return None  # $ref, allOf, enum, pattern, ...: leave it to jsonschema
    validating = node.keys() & known
    if validating <= {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} and node.get(
        "type", "number"
    ) in ("number", ["number"]):
        return _numeric_check(node)  # the usual metric spec, in one closure
    checks: list[_Check] = []
    if "type" in node:
        checks.append(_type_check((node["type"],) if isinstance(node["type"], str) else tuple(node["type"])))
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in node:
            checks.append(_bound_check(key, node[key]))
    props: dict[str, _Check] = {}
    for name, spec in node.get("properties", {}).items():
        if (check := _fast_node(spec, known)) is None:
            return None
        props[name] = check
    extra = _fast_node(node.get("additionalProperties", True), known)
    if extra is None:
        return None
    required = list(node.get("required", ()))
    min_props, max_props = node.get("minProperties"), node.get("maxProperties")

    def object_check(value: Any) -> bool:
        if not isinstance(value, dict):
            return True
        for name in required:
            if name not in value:
                return False
        if min_props is not None and len(value) < min_props:
            return False
        if max_props is not None and len(value) > max_props:
            return False
        for name, item in value.items():  # noqa: SIM110 - a plain loop: this runs per value on the ingest hot path
            if not props.get(name, extra)(item):
                return False
        return True

    if (
        "properties" in node
        or required
        or "additionalProperties" in node
        or min_props is not None
        or max_props is not None
    ):
        checks.append(object_check)
    if len(checks) == 1:
        return checks[0]

    def every(value: Any) -> bool:
        for check in checks:  # noqa: SIM110 - a plain loop: this runs per value on the ingest hot path
            if not check(value):
                return False
        return True

    return every


def fast_checker(definition: Mapping[str, Any]) -> _Check | None:
    """An exact, fast equivalent of jsonschema's verdict on payload items, when the schema allows one.

    Only for drafts 6 and later (draft 4's boolean exclusive bounds are left to jsonschema) and the
    keywords in `_FAST_KEYWORDS`; None otherwise. A unit test holds it to jsonschema's verdicts.
    """
    cls = validator_class(definition)
    if cls not in _FAST_DRAFTS:
        return None
    return _fast_node(definition, frozenset(cls.VALIDATORS))


class CompiledSchema:
    """One version of a device type's schema, compiled once: validates the items of a message."""

    def __init__(self, tenant_id: str, device_type: str, version: int, definition: Mapping[str, Any]) -> None:
        self.tenant_id = tenant_id
        self.device_type = device_type
        self.version = version
        self.definition = definition
        self.error: str | None = None  # why a stored definition cannot be used (every message is rejected)
        try:
            check_definition(definition)
            self.validator: Validator | None = validator_class(definition)(definition)
            self.fast = fast_checker(definition)
        except SchemaError as exc:
            self.validator, self.fast, self.error = None, None, str(exc)

    def check_items(self, items: Sequence[dict[str, Any]]) -> SchemaViolation | None:
        """The first item (in order) that breaks the schema, explained; None when all conform."""
        for item in items:
            if self.fast is not None and self.fast(item):
                continue
            if self.validator is None:
                return SchemaViolation(
                    self.device_type, self.version, "/", f"unusable schema: {self.error}", item["ts"]
                )
            error = best_match(self.validator.iter_errors(item))
            if error is None:
                continue
            pointer = "/" + "/".join(escape_pointer(str(p)) for p in error.absolute_path)
            message = (
                error.message if len(error.message) <= MAX_MESSAGE_CHARS else error.message[:MAX_MESSAGE_CHARS] + "..."
            )
            return SchemaViolation(self.device_type, self.version, pointer, message, item["ts"])
        return None

    def explain(self, item: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Every way `item` breaks the schema, as (JSON pointer into the item, message), by pointer; [] if none."""
        if self.validator is None:
            return [("/", f"unusable schema: {self.error}")]
        found = []
        for error in self.validator.iter_errors(item):
            pointer = "/" + "/".join(escape_pointer(str(p)) for p in error.absolute_path)
            message = error.message
            if len(message) > MAX_MESSAGE_CHARS:
                message = message[:MAX_MESSAGE_CHARS] + "..."
            found.append((pointer, message))
        return sorted(found)

    def check_points(self, points: Iterable[Point]) -> SchemaViolation | None:
        """Validate an envelope's points, rebuilt into payload items (see `payload_items`)."""
        return self.check_items(payload_items(points))

    def check_readings(self, readings: Iterable[Reading]) -> SchemaViolation | None:
        """Validate normalised readings of one device."""
        return self.check_points((r.metric, r.ts, r.value, r.quality) for r in readings)


@dataclass(frozen=True)
class SampleError:
    """Why a sample payload would be rejected on ingest."""

    index: int | None  # the item, when the sample is an array
    pointer: str  # JSON pointer into the sample as sent
    message: str
    stage: str  # "payload": the ingest parser refuses it; "schema": it breaks the schema


def validate_sample(schema: CompiledSchema, sample: Any, max_errors: int = 100) -> tuple[int, list[SampleError]]:
    """(items, errors) of a sample device payload (an item `{"ts", "values", "quality"?}` or an array of them).

    Judged as ingest judges it: each item is parsed by the device payload parser (`sensormine.payload`),
    then the normalised item the consumer rebuilds (ISO-8601 UTC `ts`, float values, quality name) is
    validated against `schema` with its jsonschema validator. Unlike the consumer, which stops at the
    first failure, every error of every item is listed (up to `max_errors`).
    """
    try:
        items, base = sample_items(sample)
    except PayloadError as exc:
        return 0, [SampleError(None, "/", exc.reason, "payload")]
    errors: list[SampleError] = []
    for i, item in enumerate(items):
        if len(errors) >= max_errors:
            break
        prefix = base.format(i) if base else ""
        index = i if base else None
        try:
            readings = parse_reading_item(item, prefix, "", "", 0)
        except PayloadError as exc:
            errors.append(SampleError(index, exc.pointer or prefix or "/", exc.reason, "payload"))
            continue
        for normalised in payload_items((r.metric, r.ts, r.value, r.quality) for r in readings):
            for pointer, message in schema.explain(normalised):
                where = prefix + pointer if pointer != "/" else prefix or "/"
                errors.append(SampleError(index, where, message, "schema"))
    return len(items), errors[:max_errors]


class SchemaDirectory:
    """The latest schema of every device that has one, compiled, for the ingest hot path.

    Like `registry.DeviceDirectory`: loaded at start, reloaded when older than `ttl_s`, and on demand
    (`refresh_if_older`) when a message fails validation, so a fixed schema is picked up at once.
    Compiled schemas are kept across reloads while their version stays the latest.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection], ttl_s: float = 30.0) -> None:
        self._connect = connect
        self.ttl_s = ttl_s
        self._compiled: dict[tuple[str, str, int], CompiledSchema] = {}
        self._devices: dict[tuple[str, str], CompiledSchema] = {}
        self.loaded_at = -math.inf
        self.generation = 0  # counts reloads, so callers can rebuild what they derive from `devices`
        self._lock = threading.Lock()

    def load(self, conn: psycopg.Connection) -> None:
        """Reload from the registry over `conn` (in its current transaction)."""
        latest = conn.execute(
            "SELECT tenant_id, device_type, max(version) FROM device_schemas GROUP BY tenant_id, device_type"
        ).fetchall()
        wanted = {(t, d, int(v)) for t, d, v in latest}
        missing = sorted(wanted - self._compiled.keys())
        compiled = {key: self._compiled[key] for key in wanted & self._compiled.keys()}
        if missing:
            rows = conn.execute(
                "SELECT tenant_id, device_type, version, definition FROM device_schemas "
                "WHERE (tenant_id, device_type, version) IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::int[]))",
                ([m[0] for m in missing], [m[1] for m in missing], [m[2] for m in missing]),
            ).fetchall()
            for tenant_id, device_type, version, definition in rows:
                schema = CompiledSchema(tenant_id, device_type, int(version), definition)
                if schema.error:
                    log.error("schema %s/%s v%d is unusable: %s", tenant_id, device_type, version, schema.error)
                compiled[(tenant_id, device_type, int(version))] = schema
        by_type = {(key[0], key[1]): schema for key, schema in compiled.items()}
        devices = conn.execute(
            "SELECT d.tenant_id, d.id, d.device_type FROM devices d WHERE d.device_type IS NOT NULL AND EXISTS "
            "(SELECT 1 FROM device_schemas s WHERE s.tenant_id = d.tenant_id AND s.device_type = d.device_type)"
        ).fetchall()
        with self._lock:
            self._compiled = compiled
            self._devices = {(t, d): by_type[(t, ty)] for t, d, ty in devices if (t, ty) in by_type}
            self.loaded_at = time.monotonic()
            self.generation += 1

    def refresh(self) -> None:
        """Reload from the registry on a new connection."""
        with self._connect() as conn:
            self.load(conn)

    def refresh_if_older(self, age_s: float) -> bool:
        """Reload when the last load is older than `age_s`; True when it reloaded."""
        if time.monotonic() - self.loaded_at <= age_s:
            return False
        self.refresh()
        return True

    def due(self) -> bool:
        """Whether the cache is older than its ttl."""
        return time.monotonic() - self.loaded_at > self.ttl_s

    @property
    def devices(self) -> Mapping[tuple[str, str], CompiledSchema]:
        """(tenant, device) -> its latest compiled schema, for the devices that have one."""
        return self._devices

    def for_device(self, tenant_id: str, device_id: str) -> CompiledSchema | None:
        """The device's latest schema, or None when it has none (no type, or a type without schema)."""
        return self._devices.get((tenant_id, device_id))

    def check(self, tenant_id: str, device_id: str, readings: Iterable[Reading]) -> SchemaViolation | None:
        """Validate one device's readings against its schema; None when they conform or it has none."""
        schema = self.for_device(tenant_id, device_id)
        return None if schema is None else schema.check_readings(readings)
