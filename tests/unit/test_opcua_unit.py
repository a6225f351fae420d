"""OPC UA daemon conversions: status -> quality, values, timestamps, and a publish response -> batches."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from asyncua import ua

from ingest_daemons.opcua import (
    DeviceSession,
    NotNumeric,
    OpcUaOptions,
    Rejection,
    numeric_value,
    quality_of,
    queue_size,
    status_name,
    timestamp_us,
    to_point,
)
from sensormine.devices.profiles import OpcUaProfile, StoredProfile
from sensormine.reading import QUALITY_BAD, QUALITY_GOOD, QUALITY_UNCERTAIN, Reading, datetime_to_us

TS = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
TS_US = datetime_to_us(TS)
NOW = TS_US + 5_000_000


def dv(value: Any, status: int = 0, source: datetime | None = TS, server: datetime | None = None) -> ua.DataValue:
    variant = value if isinstance(value, ua.Variant) else ua.Variant(value)
    return ua.DataValue(variant, ua.StatusCode(status), SourceTimestamp=source, ServerTimestamp=server)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "quality"),
    [
        (ua.StatusCodes.Good, QUALITY_GOOD),
        (ua.StatusCodes.GoodClamped, QUALITY_GOOD),
        (ua.StatusCodes.GoodLocalOverride, QUALITY_GOOD),
        (ua.StatusCodes.Uncertain, QUALITY_UNCERTAIN),
        (ua.StatusCodes.UncertainLastUsableValue, QUALITY_UNCERTAIN),
        (ua.StatusCodes.UncertainSensorNotAccurate, QUALITY_UNCERTAIN),
        (ua.StatusCodes.Bad, QUALITY_BAD),
        (ua.StatusCodes.BadSensorFailure, QUALITY_BAD),
        (ua.StatusCodes.BadCommunicationError, QUALITY_BAD),
        (ua.StatusCodes.BadNodeIdUnknown, QUALITY_BAD),
        (0xC0000000, QUALITY_BAD),  # severity 11 is reserved: treated as Bad
        (0x0000_0400, QUALITY_GOOD),  # info bits (e.g. overflow) do not change the severity
    ],
)
def test_status_code_severity_becomes_quality(status: int, quality: int) -> None:
    assert quality_of(status) == quality


def test_status_names() -> None:
    assert status_name(ua.StatusCodes.BadSensorFailure) == "BadSensorFailure"
    assert status_name(0) == "Good"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (21.5, 21.5),
        (-3, -3.0),
        (0, 0.0),
        (True, 1.0),
        (False, 0.0),
        (2**53, float(2**53)),
        (ua.UInt32(4_000_000_000), 4e9),
        (ua.Float(0.5), 0.5),
        (ua.VariantType.Double, 11.0),  # an IntEnum (OPC UA enumerations) is its integer value
    ],
)
def test_numeric_values_become_floats(raw: object, expected: float) -> None:
    value = numeric_value(raw)
    assert type(value) is float and value == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("running", "non-numeric value of type str"),
        (b"\x00\x01", "non-numeric value of type bytes"),
        (TS, "non-numeric value of type datetime"),
        (ua.LocalizedText("on"), "non-numeric value of type LocalizedText"),
        ([1.0, 2.0], "array values are not supported"),
        (math.nan, "value is not finite (nan)"),
        (math.inf, "value is not finite (inf)"),
        (10**400, "integer too large for float64"),
    ],
)
def test_other_values_are_refused_with_a_reason(raw: object, reason: str) -> None:
    with pytest.raises(NotNumeric, match=r"^" + reason.replace("(", r"\(").replace(")", r"\)") + "$"):
        numeric_value(raw)


def test_timestamps_prefer_source_then_server_then_now() -> None:
    later = datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC)
    assert timestamp_us(dv(1.0, source=TS, server=later), NOW) == TS_US
    assert timestamp_us(dv(1.0, source=None, server=later), NOW) == datetime_to_us(later)
    assert timestamp_us(dv(1.0, source=None, server=None), NOW) == NOW
    unset = datetime(1601, 1, 1, tzinfo=UTC)  # an OPC UA DateTime of 0
    assert timestamp_us(dv(1.0, source=unset, server=later), NOW) == datetime_to_us(later)
    naive = datetime(2026, 11, 26, 10, 0, 0, 123456)  # taken as UTC
    assert timestamp_us(dv(1.0, source=naive), NOW) == TS_US


def test_good_and_uncertain_values_keep_their_value() -> None:
    assert to_point(dv(21.5), None, NOW) == (TS_US, 21.5, QUALITY_GOOD)
    assert to_point(dv(ua.Variant(7, ua.VariantType.Int32)), 3.0, NOW) == (TS_US, 7.0, QUALITY_GOOD)
    uncertain = dv(19.0, ua.StatusCodes.UncertainLastUsableValue)
    assert to_point(uncertain, 21.5, NOW) == (TS_US, 19.0, QUALITY_UNCERTAIN)


def test_bad_holds_the_last_value_and_is_dropped_without_one() -> None:
    bad = dv(None, ua.StatusCodes.BadSensorFailure)
    assert to_point(bad, 21.5, NOW) == (TS_US, 21.5, QUALITY_BAD)
    assert to_point(bad, None, NOW) is None
    # The spec says a Bad status's value is to be ignored, even if a server sends one.
    assert to_point(dv(99.0, ua.StatusCodes.BadOutOfRange), 21.5, NOW) == (TS_US, 21.5, QUALITY_BAD)
    assert to_point(dv(None, ua.StatusCodes.UncertainNoCommunicationLastUsableValue), 4.0, NOW) == (
        TS_US,
        4.0,
        QUALITY_UNCERTAIN,
    )
    assert to_point(dv(None), 4.0, NOW) is None  # Good without a value: nothing to record


def test_non_numeric_values_are_rejections() -> None:
    assert to_point(dv("stopped"), 1.0, NOW) == Rejection("non-numeric value of type str", "stopped")
    nan = to_point(dv(ua.Variant(math.nan, ua.VariantType.Double)), 1.0, NOW)
    assert isinstance(nan, Rejection) and nan.reason == "value is not finite (nan)"


def test_queue_size_covers_two_publishing_intervals() -> None:
    assert queue_size(1000, 1000) == 10  # at least 10
    assert queue_size(1000, 10) == 200
    assert queue_size(60_000, 1) == 1000  # at most 1000
    assert queue_size(500, 0) == 100  # "fastest": room for bursts


# --- a publish response through a device session, without a network ---


def session(max_per_message: int = 5_000) -> tuple[DeviceSession, list[tuple[Any, ...]]]:
    profile = OpcUaProfile(
        endpoint="opc.tcp://127.0.0.1:4840",
        nodes=[
            {"node_id": "ns=2;s=m.temperature", "metric": "temperature"},  # type: ignore[list-item]
            {"node_id": "ns=2;s=m.state", "metric": "state"},  # type: ignore[list-item]
        ],
    )
    out: list[tuple[Any, ...]] = []
    s = DeviceSession(
        StoredProfile("acme", "m-1", profile, 1), OpcUaOptions(max_readings_per_message=max_per_message), out.append
    )
    s._handles = dict(enumerate(profile.nodes, start=1))
    return s, out


def publish(*items: tuple[int, ua.DataValue]) -> ua.PublishResult:
    change = ua.DataChangeNotification(
        MonitoredItems=[ua.MonitoredItemNotification(ClientHandle=h, Value=v) for h, v in items]  # type: ignore[arg-type]
    )
    return ua.PublishResult(NotificationMessage=ua.NotificationMessage(NotificationData=[change]))  # type: ignore[list-item]


def test_a_publish_response_is_one_batch_per_device_and_rejects_go_apart() -> None:
    s, out = session()
    s._convert(
        publish(
            (1, dv(21.5, source=TS)),
            (2, dv("running")),
            (1, dv(None, ua.StatusCodes.BadSensorFailure, source=datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC))),
            (99, dv(1.0)),  # a handle of a replaced subscription: ignored
        )
    )
    assert [o[0] for o in out] == ["reject", "publish"]
    _, origin, reason, payload, tenant, device = out[0]
    assert (origin, reason, tenant, device) == (
        "opc.tcp://127.0.0.1:4840#ns=2;s=m.state",
        "non-numeric value of type str",
        "acme",
        "m-1",
    )
    assert b'"value":"running"' in payload and b'"status":"Good"' in payload
    _, tenant, device, readings = out[1]
    assert (tenant, device) == ("acme", "m-1")
    ingest = readings[0].ingest_ts
    assert readings == [
        Reading("acme", "m-1", "temperature", TS_US, 21.5, QUALITY_GOOD, ingest),
        Reading("acme", "m-1", "temperature", TS_US + 1_000_000 - 123456, 21.5, QUALITY_BAD, ingest),
    ]
    st = s.status
    assert (st.notifications, st.readings, st.rejected, st.empty) == (4, 2, 1, 0)


def test_the_last_value_survives_between_responses_and_bad_first_is_counted() -> None:
    s, out = session()
    s._convert(publish((1, dv(None, ua.StatusCodes.BadCommunicationError))))
    assert out == [] and s.status.empty == 1
    s._convert(publish((1, dv(20.0))))
    s._convert(publish((1, dv(None, ua.StatusCodes.BadCommunicationError))))
    assert [(r.value, r.quality) for o in out for r in o[3]] == [(20.0, QUALITY_GOOD), (20.0, QUALITY_BAD)]


def test_large_responses_are_split_into_messages() -> None:
    s, out = session(max_per_message=3)
    s._convert(publish(*[(1, dv(float(i), source=datetime(2026, 11, 26, 10, 0, i, tzinfo=UTC))) for i in range(7)]))
    assert [len(o[3]) for o in out] == [3, 3, 1]
    assert [r.value for o in out for r in o[3]] == [float(i) for i in range(7)]


def test_keep_alives_do_nothing_and_a_bad_subscription_status_means_reconnect() -> None:
    s, out = session()
    s._convert(ua.PublishResult(NotificationMessage=ua.NotificationMessage(NotificationData=[])))
    assert out == [] and s._lost is None
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    s._convert(ua.PublishResult(NotificationMessage=ua.NotificationMessage(NotificationData=[status])))  # type: ignore[list-item]
    assert s._lost == "subscription status BadTimeout"
