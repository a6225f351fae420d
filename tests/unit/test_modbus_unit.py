"""Modbus decoding, encoding and read planning, checked against register contents computed independently."""

from __future__ import annotations

import math
import struct
from unittest.mock import ANY

import pytest

from ingest_daemons.modbus import BACKOFF, DevicePoller, DeviceStats
from ingest_daemons.modbus_codec import (
    MAX_READ_BITS,
    MAX_READ_REGISTERS,
    CodecError,
    ReadRequest,
    decode_registers,
    encode_point,
    encode_registers,
    plan_reads,
    split_request,
)
from ingest_daemons.simulators.modbus_server import STATIC_VALUES, register_map
from sensormine.devices.profiles import ModbusPoint, ModbusProfile, StoredProfile
from sensormine.reading import QUALITY_BAD, QUALITY_GOOD, Reading

ORDERS = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]
STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f", "float64": ">d"}
VALUES: dict[str, list[float]] = {
    "int16": [-32768, -1, 0, 12345, 32767],
    "uint16": [0, 1, 0xABCD, 65535],
    "int32": [-(2**31), -123456789, 0, 0x12345678, 2**31 - 1],
    "uint32": [0, 0xDEADBEEF, 2**32 - 1],
    "float32": [1.0, -42.5, 47.3, 3.4e38, 1e-40, 0.0],
    "float64": [math.pi, -1e300, 12.345678901234, 5e-324],
}


def device_registers(data_type: str, value: float, byte_order: str, word_order: str) -> list[int]:
    """What a device sends for `value`, built byte by byte: the big-endian image (ABCD…), each
    register's two bytes swapped for byte order little, the registers reversed for word order little."""
    image = struct.pack(STRUCT[data_type], value)
    pairs = [image[i : i + 2] for i in range(0, len(image), 2)]
    if byte_order == "little":
        pairs = [p[::-1] for p in pairs]
    if word_order == "little":
        pairs = pairs[::-1]
    return [p[0] << 8 | p[1] for p in pairs]


def as_stored(data_type: str, value: float) -> float:
    """The value a register of that type can hold (float32 rounds)."""
    return struct.unpack(STRUCT[data_type], struct.pack(STRUCT[data_type], value))[0]


CASES = [(t, v, b, w) for t, vs in VALUES.items() for v in vs for b, w in ORDERS]


@pytest.mark.parametrize(("data_type", "value", "byte_order", "word_order"), CASES)
def test_decode_every_type_and_order(data_type: str, value: float, byte_order: str, word_order: str) -> None:
    words = device_registers(data_type, value, byte_order, word_order)
    assert decode_registers(data_type, words, byte_order, word_order) == as_stored(data_type, value)


@pytest.mark.parametrize(("data_type", "value", "byte_order", "word_order"), CASES)
def test_encode_is_the_inverse(data_type: str, value: float, byte_order: str, word_order: str) -> None:
    assert encode_registers(data_type, value, byte_order, word_order) == device_registers(
        data_type, value, byte_order, word_order
    )


@pytest.mark.parametrize(
    ("byte_order", "word_order", "words"),
    [
        ("big", "big", [0x3F80, 0x0000]),  # ABCD
        ("little", "big", [0x803F, 0x0000]),  # BADC
        ("big", "little", [0x0000, 0x3F80]),  # CDAB
        ("little", "little", [0x0000, 0x803F]),  # DCBA
    ],
)
def test_float32_one_in_the_four_layouts_devices_use(byte_order: str, word_order: str, words: list[int]) -> None:
    assert decode_registers("float32", words, byte_order, word_order) == 1.0


def test_known_integer_layouts() -> None:
    assert decode_registers("int32", [0x1234, 0x5678]) == 0x12345678
    assert decode_registers("int32", [0x5678, 0x1234], word_order="little") == 0x12345678
    assert decode_registers("int32", [0x3412, 0x7856], byte_order="little") == 0x12345678
    assert decode_registers("uint32", [0xFFFF, 0xFFFE]) == 0xFFFFFFFE
    assert decode_registers("int32", [0xFFFF, 0xFFFE]) == -2
    assert decode_registers("int16", [0x8000]) == -32768
    assert decode_registers("int16", [0x8000], byte_order="little") == 128
    assert decode_registers("int16", [0x0080], byte_order="little") == -32768
    assert decode_registers("uint16", [0xFFFF]) == 65535
    # float64 1.0 = 3FF0 0000 0000 0000; word order little puts the 3FF0 word last.
    assert decode_registers("float64", [0, 0, 0, 0x3FF0], word_order="little") == 1.0
    assert decode_registers("float64", [0, 0, 0, 0xF03F], byte_order="little", word_order="little") == 1.0


def test_bool_register_is_one_when_nonzero() -> None:
    assert [decode_registers("bool", [w]) for w in (0, 1, 0x8000, 0xFFFF)] == [0.0, 1.0, 1.0, 1.0]


def test_wrong_register_count_is_refused() -> None:
    with pytest.raises(CodecError):
        decode_registers("float32", [1])
    with pytest.raises(CodecError):
        encode_registers("uint16", 70000)


def test_scale_and_offset_apply_after_decoding() -> None:
    points = (
        ModbusPoint(metric="level", address=10, data_type="uint16", scale=0.01),
        ModbusPoint(metric="temp", address=11, data_type="uint16", scale=0.1, offset=-273.15),
        ModbusPoint(metric="power", address=12, data_type="int32", word_order="little", scale=2.5, offset=100.0),
    )
    request = ReadRequest("holding", 10, 4, points)
    # 6327 → 63.27 %; 2932 → 293.2 K → 20.05 °C; -1000 (CDAB) → -2500 + 100.
    minus_1000_cdab = [0xFC18, 0xFFFF]
    assert request.decode([6327, 2932, *minus_1000_cdab]) == [6327 * 0.01, 2932 * 0.1 - 273.15, -1000 * 2.5 + 100.0]
    assert encode_point(points[0], 63.27) == [6327]
    assert encode_point(points[1], 20.05) == [2932]
    assert encode_point(points[2], -2400.0) == minus_1000_cdab


def test_bits_decode_with_scale() -> None:
    points = (
        ModbusPoint(metric="a", table="coil", address=3, data_type="bool"),
        ModbusPoint(metric="b", table="coil", address=5, data_type="bool", scale=10, offset=1),
    )
    request = ReadRequest("coil", 3, 3, points)
    # pymodbus pads bit responses to whole bytes.
    assert request.decode([True, False, True, False, False, False, False, False]) == [1.0, 11.0]
    assert request.decode([False, True, False]) == [0.0, 1.0]


def test_short_response_is_refused() -> None:
    request = ReadRequest("holding", 0, 2, (ModbusPoint(metric="x", address=0, data_type="float32"),))
    with pytest.raises(CodecError):
        request.decode([0x3F80])


def points_at(table: str, addresses: list[int], data_type: str = "uint16") -> list[ModbusPoint]:
    return [ModbusPoint(metric=f"{table}{a}", table=table, address=a, data_type=data_type) for a in addresses]  # type: ignore[arg-type]


def test_contiguous_points_become_one_request() -> None:
    plan = plan_reads([*points_at("holding", [0, 1, 2, 3]), ModbusPoint(metric="f", address=4, data_type="float64")])
    assert [(r.table, r.address, r.count, len(r.points)) for r in plan] == [("holding", 0, 8, 5)]


def test_small_gaps_are_read_through_large_gaps_split() -> None:
    plan = plan_reads(points_at("holding", [0, 5, 14, 100]), max_gap_registers=8)
    # 0→5: gap 4; 5→14: gap 8 (allowed); 14→100: gap 85 (new request).
    assert [(r.address, r.count) for r in plan] == [(0, 15), (100, 1)]
    strict = plan_reads(points_at("holding", [0, 1, 3]), max_gap_registers=0)
    assert [(r.address, r.count) for r in strict] == [(0, 2), (3, 1)]


def test_requests_respect_the_spec_limits() -> None:
    plan = plan_reads(points_at("input", list(range(300))))
    assert [(r.address, r.count) for r in plan] == [(0, 125), (125, 125), (250, 50)]
    assert all(r.count <= MAX_READ_REGISTERS for r in plan)
    # A float32 at 124 would make 126 registers: it starts the next request instead of straddling.
    plan = plan_reads(
        [*points_at("holding", list(range(124))), ModbusPoint(metric="f", address=124, data_type="float32")]
    )
    assert [(r.address, r.count) for r in plan] == [(0, 124), (124, 2)]
    bits = plan_reads(points_at("coil", list(range(4500)), "bool"))
    assert [(r.address, r.count) for r in bits] == [(0, 2000), (2000, 2000), (4000, 500)]
    assert all(r.count <= MAX_READ_BITS for r in bits)


def test_tables_are_never_mixed_and_come_out_in_order() -> None:
    points = (
        points_at("discrete", [0], "bool")
        + points_at("input", [0, 1])
        + points_at("coil", [0, 1], "bool")
        + points_at("holding", [0, 1])
    )
    plan = plan_reads(points)
    assert [(r.table, r.address, r.count) for r in plan] == [
        ("holding", 0, 2),
        ("input", 0, 2),
        ("coil", 0, 2),
        ("discrete", 0, 1),
    ]
    assert [r.is_bits for r in plan] == [False, False, True, True]


def test_overlapping_points_share_registers() -> None:
    # A uint32 and its low word as a uint16, and a point given out of address order.
    points = [
        ModbusPoint(metric="low", address=11, data_type="uint16"),
        ModbusPoint(metric="whole", address=10, data_type="uint32"),
    ]
    (request,) = plan_reads(points)
    assert (request.address, request.count) == (10, 2)
    values = dict(zip([p.metric for p in request.points], request.decode([0x0001, 0x0002]), strict=True))
    assert values == {"whole": 0x00010002, "low": 2}


def test_batched_decode_takes_each_point_at_its_offset() -> None:
    points = [
        ModbusPoint(metric="t", address=100, data_type="float32"),
        ModbusPoint(metric="n", address=104, data_type="int16", byte_order="little"),
    ]
    (request,) = plan_reads(points)
    words = [
        *device_registers("float32", 47.3, "big", "big"),
        0xAAAA,
        0xBBBB,
        *device_registers("int16", -5, "little", "big"),
    ]
    assert (request.address, request.count) == (100, 5)
    assert request.decode(words) == [as_stored("float32", 47.3), -5.0]


def test_split_request_reads_each_point_alone() -> None:
    (request,) = plan_reads([*points_at("holding", [3, 4]), ModbusPoint(metric="f", address=6, data_type="float32")])
    assert [(r.address, r.count, [p.metric for p in r.points]) for r in split_request(request)] == [
        (3, 1, ["holding3"]),
        (4, 1, ["holding4"]),
        (6, 2, ["f"]),
    ]


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [BACKOFF.delay(n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]  # no jitter
    assert BACKOFF.delay(49) == 30.0


def test_simulator_static_values_fit_their_registers() -> None:
    # Every static value survives encoding: what the simulator serves is what tests expect.
    points = {p.metric: p for p in register_map()}
    assert set(points) == set(STATIC_VALUES)
    for metric, value in STATIC_VALUES.items():
        p = points[metric]
        words = encode_point(p, value)
        if p.table in ("coil", "discrete"):
            assert words == [int(value)]
            continue
        raw = decode_registers(p.data_type, words, p.byte_order, p.word_order)
        assert raw * p.scale + p.offset == pytest.approx(value, rel=1e-6), metric


async def no_emit(tenant_id: str, device_id: str, readings: list[Reading]) -> None:
    """Emit nowhere: these tests call the poller's reading builder directly."""


def test_poll_results_become_readings_good_bad_and_held() -> None:
    profile = ModbusProfile(
        host="127.0.0.1",
        points=[
            ModbusPoint(metric="t", address=0, data_type="float32"),
            ModbusPoint(metric="n", address=2, data_type="int16"),
            ModbusPoint(metric="c", table="coil", address=0, data_type="bool"),
        ],
    )
    poller = DevicePoller(StoredProfile("acme", "plc", profile, 1), no_emit, DeviceStats(), {})
    assert [(r.table, r.count) for r in poller.plan] == [("holding", 3), ("coil", 1)]
    first = poller._readings(10, poller.plan, [[21.5, -3.0], [1.0]])
    assert [(r.metric, r.ts, r.value, r.quality) for r in first.readings] == [
        ("t", 10, 21.5, QUALITY_GOOD),
        ("n", 10, -3.0, QUALITY_GOOD),
        ("c", 10, 1.0, QUALITY_GOOD),
    ]
    assert (first.good, first.skipped) == (3, 0)
    # A NaN register is bad (holding the last good value); an unread request is bad as a whole.
    second = poller._readings(20, poller.plan, [[math.nan, -4.0], None])
    assert [(r.metric, r.value, r.quality) for r in second.readings] == [
        ("t", 21.5, QUALITY_BAD),
        ("n", -4.0, QUALITY_GOOD),
        ("c", 1.0, QUALITY_BAD),
    ]
    assert (second.good, second.skipped) == (1, 0)
    assert all(r.tenant_id == "acme" and r.device_id == "plc" and r.ingest_ts > 0 for r in first.readings)
    # A point never read has no value to hold: nothing is published for it, it is counted.
    fresh = DevicePoller(StoredProfile("acme", "plc", profile, 1), no_emit, DeviceStats(), {})
    third = fresh._readings(30, fresh.plan, [None, [1.0]])
    assert third.readings == [("acme", "plc", "c", 30, 1.0, QUALITY_GOOD, ANY)]
    assert (third.good, third.skipped) == (1, 2)
