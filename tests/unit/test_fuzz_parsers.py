"""Fuzzing the MQTT and HTTP payload parsers: nothing crashes, every input is accepted or dead-lettered."""

from __future__ import annotations

import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest_daemons.mqtt import MqttIngest
from sensormine.reading import Reading
from sensormine.telemetry.batch import parse_csv_batch, parse_json_batch
from sensormine.telemetry.payload import METRIC_RE, PayloadError

TOPIC = "sensormine/acme/d1/telemetry"
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class RecordingSink:
    """Unit-test sink: remembers what the daemon handed over."""

    def __init__(self) -> None:
        self.published: list[list[Reading]] = []
        self.rejected: list[tuple[str, bytes]] = []

    def publish(self, tenant_id: str, device_id: str, source: str, readings: list[Reading], done: Any = None) -> None:
        self.published.append(readings)

    def reject(self, source: str, origin: str, reason: str, payload: bytes, *args: Any, done: Any = None) -> None:
        self.rejected.append((reason, payload))

    def poll(self, timeout: float = 0.0) -> None: ...

    def flush(self, timeout: float = 10.0) -> int:
        return 0


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
timestamps = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(["2026-11-26T10:00:00Z", "2026-11-26T10:00:00+02:00", "2026-13-01", "", "now"]),
    st.floats(),
    json_values,
)
readings_obj = st.fixed_dictionaries(
    {
        "ts": timestamps,
        "values": st.one_of(st.dictionaries(st.text(max_size=12), json_values, max_size=5), json_values),
    },
    optional={"quality": st.one_of(st.sampled_from(["good", "bad", "uncertain", "GOOD", "meh"]), json_values)},
)


def encoded(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return repr(doc).encode()


payloads = st.one_of(
    st.binary(max_size=300),
    readings_obj.map(encoded),
    st.lists(readings_obj, max_size=5).map(encoded),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),  # deep nesting
    st.sampled_from([b'{"ts": 1, "values": {"x": NaN}}', b'{"ts": 1, "values": {"x": Infinity}}', b"\xff\xfe{"]),
    st.text(max_size=100).map(lambda t: t.encode("utf-16")),  # a foreign encoding
)


def assert_sane(readings: list[Reading]) -> None:
    for r in readings:
        assert math.isfinite(r.value) and METRIC_RE.match(r.metric) and r.quality in (0, 1, 2)
        assert (r.tenant_id, r.device_id) == ("acme", "d1")


@FUZZ
@given(payloads)
def test_every_mqtt_payload_is_published_or_dead_lettered(payload: bytes) -> None:
    sink = RecordingSink()
    ingest = MqttIngest(sink, lambda t, d: True)  # type: ignore[arg-type]
    accepted = ingest.handle(TOPIC, payload)
    assert len(sink.published) + len(sink.rejected) == 1
    if accepted:
        assert_sane(sink.published[0])
    else:
        reason, kept = sink.rejected[0]
        assert reason and kept == payload  # the DLQ keeps the original bytes


@FUZZ
@given(payloads)
def test_every_json_batch_item_is_accepted_or_rejected(body: bytes) -> None:
    try:
        out = parse_json_batch(body, "acme", "d1", 0)
    except PayloadError as exc:
        assert exc.reason  # refused whole: the route dead-letters the body
        return
    assert out.accepted_items + len(out.rejects) == out.items >= 1
    assert_sane(out.readings)
    assert all(r.error.reason for r in out.rejects)


csv_cells = st.one_of(st.text(max_size=12), st.floats().map(str), st.integers().map(str))
csv_bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(st.lists(csv_cells, min_size=1, max_size=4), min_size=1, max_size=6).map(
        lambda rows: "\n".join(",".join(r) for r in [["ts", "temp", "rpm"], *rows]).encode()
    ),
    st.lists(st.lists(csv_cells, min_size=3, max_size=3), min_size=1, max_size=6).map(
        lambda rows: "\n".join(",".join(r) for r in [["ts", "metric", "value"], *rows]).encode()
    ),
)


@FUZZ
@given(csv_bodies)
def test_every_csv_row_is_accepted_or_rejected(body: bytes) -> None:
    try:
        out = parse_csv_batch(body, "acme", "d1", 0)
    except PayloadError as exc:
        assert exc.reason
        return
    assert out.accepted_items + len(out.rejects) == out.items >= 1
    assert_sane(out.readings)
