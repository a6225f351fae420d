"""Device schemas without a database: compatibility rules, payload items, violations, the fast checker."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema.validators import validator_for

from sensormine.reading import us_to_datetime
from sensormine.schemas.compat import SchemaError, check_definition, compatibility_problems
from sensormine.schemas.validation import CompiledSchema, _iso, exact_payload_items, fast_checker, payload_items

TS = 1_795_687_200_000_000  # 2026-11-26T10:00:00Z


def thermo(**metrics: dict[str, Any]) -> dict[str, Any]:
    """A payload schema with these metric specs (number-typed unless a spec says otherwise)."""
    return {
        "type": "object",
        "properties": {
            "ts": {"type": "string"},
            "values": {
                "type": "object",
                "properties": {m: {"type": "number", **spec} for m, spec in metrics.items()},
            },
        },
        "required": ["ts", "values"],
    }


BASE = thermo(temperature={"minimum": -40, "maximum": 50}, pressure={"exclusiveMinimum": 0})


# -- compatibility ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "new",
    [
        BASE,
        thermo(temperature={"minimum": -40, "maximum": 50}, pressure={"exclusiveMinimum": 0}, humidity={}),
        thermo(temperature={"minimum": -60, "maximum": 80}, pressure={"exclusiveMinimum": 0}),  # widened
        thermo(temperature={"minimum": -40}, pressure={}),  # bounds dropped
        thermo(temperature={"exclusiveMinimum": -41, "maximum": 50}, pressure={"minimum": 0}),  # pressure 0 now ok
        {**BASE, "properties": {**BASE["properties"], "quality": {"type": "string"}}},  # optional top-level property
        {**BASE, "required": ["values", "ts"]},  # ts and values are in every item anyway
        {**BASE, "description": "annotations change nothing"},
    ],
)
def test_compatible_successors(new: dict[str, Any]) -> None:
    assert compatibility_problems(BASE, new) == []


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (thermo(temperature={"minimum": -40, "maximum": 50}), ["removes /properties/values/properties/pressure"]),
        (
            {"type": "object", "properties": {"values": BASE["properties"]["values"]}, "required": ["values"]},
            ["removes /properties/ts"],
        ),
        (
            thermo(temperature={"type": "integer", "minimum": -40, "maximum": 50}, pressure={"exclusiveMinimum": 0}),
            ["changes the type of /properties/values/properties/temperature from number to integer"],
        ),
        (
            thermo(
                temperature={"type": ["number", "null"], "minimum": -40, "maximum": 50},
                pressure={"exclusiveMinimum": 0},
            ),
            ["changes the type of /properties/values/properties/temperature from number to null|number"],
        ),
        (
            {**BASE, "type": "array"},
            ["changes the type of the payload from object to array"],
        ),
        (
            thermo(temperature={"minimum": -40, "maximum": 40}, pressure={"exclusiveMinimum": 0}),
            ["narrows the range of temperature from [-40, 50] to [-40, 40]"],
        ),
        (
            thermo(temperature={"minimum": -40, "maximum": 50}, pressure={"exclusiveMinimum": 0, "maximum": 5}),
            ["narrows the range of pressure from [4.94066e-324, +inf] to [4.94066e-324, 5]"],
        ),
        (
            {
                **BASE,
                "properties": {
                    **BASE["properties"],
                    "values": {**BASE["properties"]["values"], "required": ["pressure"]},
                },
            },
            ["newly requires pressure in /properties/values/required"],
        ),
        (
            {**BASE, "required": ["ts", "values", "quality"]},
            ["newly requires quality in /required"],
        ),
    ],
)
def test_breaking_successors(new: dict[str, Any], expected: list[str]) -> None:
    assert compatibility_problems(BASE, new) == expected


def test_untyped_properties_becoming_typed_is_a_type_change() -> None:
    old = {"properties": {"values": {"properties": {"t": {"maximum": 10}}}}}
    new = {"properties": {"values": {"properties": {"t": {"type": "number", "maximum": 10}}}}}
    assert compatibility_problems(old, new) == [
        "changes the type of /properties/values/properties/t from any to number"
    ]
    assert compatibility_problems(new, old) == [
        "changes the type of /properties/values/properties/t from number to any"
    ]


def test_a_first_schema_with_metrics_after_an_open_one_is_compatible_unless_it_requires_them() -> None:
    assert compatibility_problems({"type": "object"}, BASE) == []
    strict = {**BASE, "properties": {**BASE["properties"], "values": {"type": "object", "required": ["t"]}}}
    assert compatibility_problems({"type": "object"}, strict) == ["newly requires t in /properties/values/required"]


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ([1], "must be a JSON object"),
        ({"type": "thing"}, "not a valid JSON Schema at /type"),
        ({"properties": {"values": {"properties": {"t": {"maximum": "hot"}}}}}, "t.maximum must be a finite number"),
        ({"required": "ts"}, "not a valid JSON Schema at /required"),
    ],
)
def test_definitions_that_are_not_usable_schemas(definition: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        check_definition(definition)


# -- payload items and violations --------------------------------------------------------------------


def test_points_become_the_items_a_device_would_have_sent() -> None:
    points = [("t", TS + 1_000_000, 2.0, 0), ("t", TS, 1.0, 0), ("p", TS, 5.0, 0), ("t", TS, 1.5, 0), ("q", TS, 9.0, 2)]
    assert payload_items(points) == [
        {"ts": "2026-11-26T10:00:00+00:00", "values": {"t": 1.0, "p": 5.0}},
        {"ts": "2026-11-26T10:00:00+00:00", "values": {"t": 1.5}},  # a repeated metric is validated too
        {"ts": "2026-11-26T10:00:00+00:00", "values": {"q": 9.0}, "quality": "bad"},
        {"ts": "2026-11-26T10:00:01+00:00", "values": {"t": 2.0}},
    ]


@given(st.integers(-(2**62), 2**62))
def test_item_timestamps_are_the_isoformat_of_the_reading(ts: int) -> None:
    try:
        expected = us_to_datetime(ts).isoformat()
    except (ValueError, OverflowError):
        expected = str(ts)
    assert _iso(ts) == expected


@pytest.mark.parametrize(
    "points",
    [
        [["t", TS, 1.0]],  # three fields
        [["t", float(TS), 1.0, 0]],  # a float timestamp
        [["t", TS, True, 0]],  # a boolean value (the reference path makes it 1.0)
        [["t", TS, "1.5", 0]],
        [[1, TS, 1.0, 0]],
        {"t": 1.0},
    ],
)
def test_exact_items_decline_points_the_reference_path_must_judge(points: Any) -> None:
    assert exact_payload_items(points) is None


def test_exact_items_match_the_items_of_the_readings() -> None:
    points = [["t", TS, 1, 0], ["p", TS, 2.5, 1]]
    assert exact_payload_items(points) == payload_items([("t", TS, 1, 0), ("p", TS, 2.5, 1)])


def test_a_violation_names_the_schema_the_pointer_and_the_validator_message() -> None:
    schema = CompiledSchema("acme", "thermo", 3, BASE)
    assert schema.fast is not None
    assert schema.check_points([("temperature", TS, 21.5, 0), ("pressure", TS, 1.0, 0)]) is None
    violation = schema.check_points([("temperature", TS, 21.5, 0), ("temperature", TS + 1, 80.5, 0)])
    assert violation is not None
    assert (violation.device_type, violation.version, violation.pointer) == ("thermo", 3, "/values/temperature")
    assert violation.message == "80.5 is greater than the maximum of 50"
    assert str(violation) == (
        "schema thermo v3: 80.5 is greater than the maximum of 50 "
        "(at /values/temperature, item ts 2026-11-26T10:00:00.000001+00:00)"
    )
    closed = CompiledSchema("acme", "thermo", 4, {**BASE, "additionalProperties": False})
    found = closed.check_points([("temperature", TS, 1.0, 1)])
    assert found is not None and found.pointer == "/" and "'quality' was unexpected" in found.message


def test_metric_names_are_escaped_in_pointers_and_slow_keywords_still_validate() -> None:
    definition = {
        "properties": {"values": {"properties": {"a/b": {"enum": [1, 2]}}, "patternProperties": {"^x": {"maximum": 1}}}}
    }
    schema = CompiledSchema("acme", "odd", 1, definition)
    assert schema.fast is None  # enum and patternProperties are left to jsonschema
    assert schema.check_points([("a/b", TS, 2.0, 0)]) is None
    violation = schema.check_points([("a/b", TS, 3.0, 0)])
    assert violation is not None and violation.pointer == "/values/a~1b"
    violation = schema.check_points([("xy", TS, 3.0, 0)])
    assert violation is not None and violation.pointer == "/values/xy"


def test_a_stored_schema_that_is_not_usable_rejects_with_its_reason() -> None:
    schema = CompiledSchema("acme", "broken", 1, {"type": "thing"})
    violation = schema.check_points([("t", TS, 1.0, 0)])
    assert violation is not None and "unusable schema: not a valid JSON Schema" in violation.message


@pytest.mark.parametrize(
    "definition",
    [
        {"$schema": "http://json-schema.org/draft-04/schema#", "properties": {}},
        {"$ref": "#/$defs/x", "$defs": {"x": {}}},
        {"properties": {"values": {"allOf": [{"required": ["t"]}]}}},
    ],
)
def test_the_fast_checker_declines_what_it_does_not_implement(definition: dict[str, Any]) -> None:
    assert fast_checker(definition) is None


# -- the fast checker agrees with jsonschema ------------------------------------------------------------

METRICS = ("a", "b", "c")
numbers = st.one_of(st.integers(-50, 50), st.floats(-50, 50, allow_nan=False), st.sampled_from([0.0, 1.0, -0.0]))
types = st.sampled_from(
    ["number", ["number"], "integer", "string", "boolean", "null", ["number", "null"], ["integer", "string"]]
)


@st.composite
def metric_specs(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.booleans())
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["type"] = draw(types)
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if draw(st.integers(0, 3)) == 0:
            spec[key] = draw(numbers)
    if draw(st.integers(0, 4)) == 0:
        spec["description"] = "annotation"
    return spec


@st.composite
def object_specs(draw: st.DrawFn, names: tuple[str, ...], children: st.SearchStrategy[Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["type"] = draw(st.sampled_from(["object", ["object", "null"], "string"]))
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    if chosen or draw(st.booleans()):
        spec["properties"] = {n: draw(children) for n in chosen}
    if draw(st.booleans()):
        spec["required"] = draw(st.lists(st.sampled_from(names), unique=True))
    if draw(st.integers(0, 2)) == 0:
        spec["additionalProperties"] = draw(st.one_of(st.booleans(), metric_specs()))
    if draw(st.integers(0, 4)) == 0:
        spec["minProperties"] = draw(st.integers(0, 3))
    if draw(st.integers(0, 4)) == 0:
        spec["maxProperties"] = draw(st.integers(0, 3))
    return spec


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    values = object_specs(METRICS, metric_specs())
    top = st.sampled_from([{}, {"type": "string"}, {"type": "integer"}, {"format": "date-time"}, True])
    root = draw(object_specs(("ts", "values", "quality"), st.one_of(values, top)))
    draft = draw(
        st.sampled_from(
            [
                None,
                "https://json-schema.org/draft/2020-12/schema",
                "https://json-schema.org/draft/2019-09/schema",
                "http://json-schema.org/draft-07/schema#",
                "http://json-schema.org/draft-06/schema#",
            ]
        )
    )
    return root if draft is None else {"$schema": draft, **root}


value_examples = st.one_of(numbers, st.booleans(), st.none(), st.sampled_from(["x", "1"]))
items = st.fixed_dictionaries(
    {
        "ts": st.sampled_from(["2026-11-26T10:00:00+00:00", "noon"]),
        "values": st.dictionaries(st.sampled_from([*METRICS, "z"]), value_examples, max_size=4),
    },
    optional={"quality": st.sampled_from(["bad", "uncertain"])},
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(definition=definitions(), samples=st.lists(items, min_size=1, max_size=5))
def test_the_fast_checker_agrees_with_jsonschema(definition: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    check_definition(definition)
    fast = fast_checker(definition)
    assert fast is not None, definition
    validator = validator_for(definition)(definition)
    schema = CompiledSchema("t", "x", 1, definition)
    for item in samples:
        assert fast(item) == validator.is_valid(item), (definition, item)
        assert (schema.check_items([item]) is None) == validator.is_valid(item)
