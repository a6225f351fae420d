"""HTTP batches: every item judged on its own, every reject with its reason and pointer."""

from __future__ import annotations

import orjson
import pytest

from sensormine.telemetry.batch import MAX_BATCH_READINGS, parse_csv_batch, parse_json_batch
from sensormine.telemetry.payload import PayloadError
from tests.factories import DAY_US

T0 = "2026-11-26T00:00:00Z"


def test_json_batch_accepts_good_items_and_rejects_bad_ones_with_pointers() -> None:
    items = [
        {"ts": T0, "values": {"temp": 20.5, "rpm": 1500}},
        {"ts": "yesterday", "values": {"temp": 1}},
        {"ts": DAY_US // 1000 + 1000, "values": {"temp": "hot"}, "quality": "bad"},
        {"ts": DAY_US // 1000 + 2000, "values": {"temp": 22.0}, "quality": "uncertain"},
        "not an object",
    ]
    out = parse_json_batch(orjson.dumps(items), "acme", "d1", 7)
    assert (out.items, out.accepted_items) == (5, 2)
    assert [(r.metric, r.ts, r.value, r.quality) for r in out.readings] == [
        ("temp", DAY_US, 20.5, 0),
        ("rpm", DAY_US, 1500.0, 0),
        ("temp", DAY_US + 2_000_000, 22.0, 1),
    ]
    assert [(r.index, r.error.pointer) for r in out.rejects] == [(1, "/1/ts"), (2, "/2/values/temp"), (4, "/4")]
    assert orjson.loads(out.rejects[1].payload) == items[2]  # the item itself goes to the DLQ
    single = parse_json_batch(orjson.dumps(items[0]), "acme", "d1", 7)
    assert single.accepted_items == 1 and len(single.readings) == 2


@pytest.mark.parametrize("body", [b"{oops", b'"a string"', b"[]", b"42"])
def test_json_that_is_not_a_batch_is_refused_whole(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_json_batch(body, "acme", "d1", 7)


def test_wide_csv_one_item_per_row_empty_cells_skipped() -> None:
    body = (
        f"ts,temp,rpm,quality\n{T0},20.5,1500,\n2026-11-26T00:00:01Z,,1510,bad\n2026-11-26T00:00:02Z,x,1,\n"
    ).encode()
    out = parse_csv_batch(body, "acme", "d1", 7)
    assert (out.items, out.accepted_items) == (3, 2)
    assert [(r.metric, r.value, r.quality) for r in out.readings] == [
        ("temp", 20.5, 0),
        ("rpm", 1500.0, 0),
        ("rpm", 1510.0, 2),
    ]
    [reject] = out.rejects
    assert (reject.index, reject.error.pointer) == (2, "/2/temp")
    assert reject.payload == b"ts,temp,rpm,quality\n2026-11-26T00:00:02Z,x,1,"


def test_long_csv_and_epoch_milliseconds() -> None:
    ms = DAY_US // 1000
    body = f"ts,metric,value\n{ms},temp,1.5\n{ms},bad metric!,2\n{ms + 1},temp,nan\n".encode()
    out = parse_csv_batch(body, "acme", "d1", 7)
    assert [(r.metric, r.ts, r.value) for r in out.readings] == [("temp", DAY_US, 1.5)]
    assert [(r.index, r.error.pointer) for r in out.rejects] == [(1, "/1/metric"), (2, "/2/value")]
    assert "not finite" in out.rejects[1].error.reason


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe\x00bad", "UTF-8"),
        (b"temp,rpm\n1,2\n", "ts column"),
        (b"ts,ts\n1,2\n", "repeats"),
        (b"ts,temp\n", "no data rows"),
        (b"", "header"),
    ],
)
def test_csv_that_is_not_a_batch_is_refused_whole(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_csv_batch(body, "acme", "d1", 7)


def test_a_row_with_the_wrong_number_of_fields_is_one_reject() -> None:
    out = parse_csv_batch(f"ts,temp\n{T0},1,2\n{T0},3\n".encode(), "acme", "d1", 7)
    assert out.accepted_items == 1 and out.rejects[0].error.reason.startswith("row has 3 fields")


def test_a_superscript_digit_timestamp_is_a_reject_not_a_crash() -> None:
    """Regression (found by the fuzz test): '²'.isdigit() is true, but int('²') raises."""
    out = parse_csv_batch(f"ts,temp\n\u00b2,1\n{T0},3\n".encode(), "acme", "d1", 7)
    assert out.accepted_items == 1 and out.rejects[0].error.pointer == "/0/ts"


def test_batches_have_a_reading_limit() -> None:
    items = [{"ts": DAY_US // 1000 + i, "values": {f"m{k}": 1 for k in range(100)}} for i in range(1001)]
    assert len(items) * 100 > MAX_BATCH_READINGS
    with pytest.raises(PayloadError, match="split it"):
        parse_json_batch(orjson.dumps(items), "acme", "d1", 7)
