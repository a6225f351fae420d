"""Device payload parsing and normalisation."""

from __future__ import annotations

import math

import orjson
import pytest

from sensormine.reading import QUALITY_BAD, Reading, datetime_to_us, us_to_datetime
from sensormine.telemetry.payload import (
    PayloadError,
    decode_envelope,
    encode_envelope,
    parse_device_payload,
    parse_timestamp,
)

T0 = "2026-11-26T10:00:00Z"
T0_US = 1_795_687_200_000_000


def parse(doc: object) -> list[Reading]:
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return parse_device_payload(raw, "acme", "press-1", ingest_ts=42)


def test_object_payload_becomes_one_reading_per_metric() -> None:
    readings = parse({"ts": T0, "values": {"temperature": 21.5, "pressure": 1.01}})
    assert readings == [
        Reading("acme", "press-1", "temperature", T0_US, 21.5, 0, 42),
        Reading("acme", "press-1", "pressure", T0_US, 1.01, 0, 42),
    ]


def test_array_payload_and_epoch_millis() -> None:
    readings = parse(
        [{"ts": 1_795_687_200_000, "values": {"a": 1}}, {"ts": "2026-11-26T11:00:00+01:00", "values": {"b": 2}}]
    )
    assert [(r.metric, r.ts, r.value) for r in readings] == [("a", T0_US, 1.0), ("b", T0_US, 2.0)]


def test_quality_and_booleans() -> None:
    (r,) = parse({"ts": T0, "values": {"valve": True}, "quality": "bad"})
    assert (r.value, r.quality) == (1.0, QUALITY_BAD)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "malformed JSON"),
        (b'"text"', "JSON object or array"),
        (b"[]", "empty array"),
        (orjson.dumps({"values": {"a": 1}}), "missing ts"),
        (orjson.dumps({"ts": "yesterday", "values": {"a": 1}}), "unparseable timestamp"),
        (orjson.dumps({"ts": T0, "values": {"a": "hot"}}), "non-numeric value"),
        (orjson.dumps({"ts": T0, "values": {"a": None}}), "non-numeric value"),
        (orjson.dumps({"ts": T0, "values": {}}), "non-empty object"),
        (orjson.dumps({"ts": T0, "values": {"bad metric!": 1}}), "metric names"),
        (orjson.dumps({"ts": 10, "values": {"a": 1}}), "outside 2000-01-01"),
        (b'{"ts": "2026-11-26T10:00:00Z", "values": {"a": 1e400}}', "malformed JSON"),
        (orjson.dumps([{"ts": T0, "values": {"a": 1}}, 5]), "reading must be a JSON object"),
    ],
)
def test_rejects_carry_a_reason(raw: bytes, fragment: str) -> None:
    with pytest.raises(PayloadError) as err:
        parse(raw)
    assert fragment in str(err.value)


def test_reject_points_at_the_failing_value() -> None:
    with pytest.raises(PayloadError) as err:
        parse([{"ts": T0, "values": {"a": 1}}, {"ts": T0, "values": {"a/b": "x"}}])
    assert err.value.pointer == "/1/values/a~1b"
    assert "non-numeric" in err.value.reason


def test_timestamp_forms_agree() -> None:
    assert parse_timestamp("2026-11-26T10:00:00Z") == parse_timestamp(1_795_687_200_000) == T0_US
    assert parse_timestamp("2026-11-26T10:00:00.123456+00:00") == T0_US + 123_456
    with pytest.raises(PayloadError):
        parse_timestamp(math.inf)
    with pytest.raises(PayloadError):
        parse_timestamp(True)


def test_us_datetime_round_trip() -> None:
    for us in (0, T0_US, T0_US + 1, 4_102_444_799_999_999):
        assert datetime_to_us(us_to_datetime(us)) == us


def test_envelope_round_trip() -> None:
    readings = parse({"ts": T0, "values": {"temperature": 21.5, "pressure": 1.01}})
    assert decode_envelope(encode_envelope("acme", "press-1", "mqtt", readings)) == readings
    with pytest.raises(PayloadError):
        decode_envelope(b'{"v": 99}')
    with pytest.raises(PayloadError):
        decode_envelope(b"garbage")


def test_timestamps_that_overflow_when_scaled_are_rejected_not_crashing() -> None:
    # Found by the fuzz test: 2e305 ms is finite, but not once scaled to microseconds.
    with pytest.raises(PayloadError, match="outside"):
        parse_device_payload(b'{"ts": 2e305, "values": {"x": 1}}', "acme", "d1", 0)
