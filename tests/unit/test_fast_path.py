"""The consumer's fast path: envelope bytes straight to binary COPY rows, checked against the reference path."""

from __future__ import annotations

import threading

import orjson
import pytest
from psycopg import adapt, postgres, pq

# psycopg's own binary COPY row encoder, i.e. exactly what `HotStoreWriter.write` sends for Readings.
from psycopg._copy_base import BinaryFormatter

from ingest_daemons.consumer import BatchWriterThread, PreparedBatch
from sensormine.clients._pgcopy import COPY_HEADER, COPY_TRAILER
from sensormine.clients.hotstore import _COPY_TYPES, CopyBatch, KafkaOffset
from sensormine.reading import US_PER_DAY, Reading, day_of, us_to_datetime
from sensormine.settings import Settings
from sensormine.telemetry.payload import decode_envelope, decode_envelope_into, encode_envelope
from sensormine.telemetry.validation import future_limit_us

T0 = 1_795_687_200_000_000  # 2026-11-26T10:00:00Z
MIDNIGHT = (T0 // US_PER_DAY + 1) * US_PER_DAY
NO_LIMIT = 1 << 62


def psycopg_copy_bytes(readings: list[Reading]) -> bytes:
    """The reference encoding: psycopg's binary COPY formatter on the same rows and column types."""
    tx = adapt.Transformer()
    tx.set_dumper_types([postgres.types[name].oid for name in _COPY_TYPES], pq.Format.BINARY)
    formatter = BinaryFormatter(tx)
    out = bytearray()
    for r in readings:
        out += formatter.write_row(
            (r.tenant_id, r.device_id, r.metric, us_to_datetime(r.ts), r.value, r.quality, us_to_datetime(r.ingest_ts))
        )
    out += formatter.end()
    return bytes(out)


def in_copy_order(readings: list[Reading]) -> list[Reading]:
    """The order CopyBatch writes rows in: by day, tenant, device, metric; arrival order within a series."""
    return sorted(readings, key=lambda r: (day_of(r.ts), r.tenant_id, r.device_id, r.metric))


def envelope(tenant: str, device: str, points: list[tuple[str, int, float, int]], ingest_ts: int = T0 + 5) -> bytes:
    return encode_envelope(
        tenant, device, "test", [Reading(tenant, device, m, ts, v, q, ingest_ts) for m, ts, v, q in points]
    )


MESSAGES = [
    envelope("acme", "press-1", [("temperature", T0, 21.5, 0), ("pressure", T0, 1.01, 1), ("valve", T0, 1.0, 2)]),
    envelope("acme", "press-1", [("temperature", T0 + 1_000_000, -3.25e-7, 0), ("pressure", T0 + 1_000_000, 0.0, 0)]),
    envelope("acme", "pump-ü", [("flow/rate:l.s", T0 + 7, 1e300, 0)]),  # non-ASCII device, punctuation in metric
    envelope("beta", "a", [("m", MIDNIGHT - 1, 1.0, 0), ("m", MIDNIGHT, 2.0, 0), ("n", MIDNIGHT + 3, 3.0, 0)]),
    envelope("acme", "press-1", [("temperature", T0 - 1_000_000, 20.0, 0)], ingest_ts=T0 - 10),  # late arrival
    # Integer values as some producers write them: the reference path turns them into floats too.
    orjson.dumps(
        {"v": 1, "tenant_id": "acme", "device_id": "int", "source": "x", "ingest_ts": T0, "points": [["m", T0, 7, 0]]}
    ),
]


def test_fast_path_writes_the_same_bytes_as_psycopg_on_the_reference_readings() -> None:
    fast = CopyBatch()
    for raw in MESSAGES:
        assert decode_envelope_into(raw, fast, NO_LIMIT) == len(decode_envelope(raw))
    reference = [r for raw in MESSAGES for r in decode_envelope(raw)]
    slow = CopyBatch()
    slow.add_readings(reference)

    assert fast.rows == slow.rows == len(reference)
    assert fast.day_numbers == slow.day_numbers == {T0 // US_PER_DAY, MIDNIGHT // US_PER_DAY}
    assert b"".join(fast.chunks()) == b"".join(slow.chunks()) == psycopg_copy_bytes(in_copy_order(reference))


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"v": 2, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1, 1.0, 0]]}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": []}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1, 1.0]]}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1.5, 1.0, 0]]}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1, "1.5", 0]]}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1, null, 0]]}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [[5, 1, 1.0, 0]]}',
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1, 1.0, 70000]]}',
        b'{"v": 1, "tenant_id": 3, "device_id": "d", "ingest_ts": 1, "points": [["m", 1, 1.0, 0]]}',
        # the second point is bad: the first must not be left behind in the batch
        b'{"v": 1, "tenant_id": "a", "device_id": "d", "ingest_ts": 1, "points": [["m", 1, 1.0, 0], ["m", 2]]}',
    ],
)
def test_fast_path_declines_anything_unusual_and_leaves_the_batch_untouched(raw: bytes) -> None:
    batch = CopyBatch()
    decode_envelope_into(MESSAGES[0], batch, NO_LIMIT)
    before = b"".join(batch.chunks())
    assert decode_envelope_into(raw, batch, NO_LIMIT) is None
    assert batch.rows == 3
    assert b"".join(batch.chunks()) == before


def test_fast_path_defers_future_timestamps_to_validation() -> None:
    settings = Settings(max_future_skew_s=60)
    limit = future_limit_us(settings, now=T0)
    ok = envelope("acme", "d", [("m", T0 + 60_000_000, 1.0, 0)])
    late = envelope("acme", "d", [("m", T0, 1.0, 0), ("m", T0 + 60_000_001, 1.0, 0)])
    batch = CopyBatch()
    assert decode_envelope_into(ok, batch, limit) == 1
    assert decode_envelope_into(late, batch, limit) is None
    assert batch.rows == 1


def test_reference_readings_with_unencodable_fields_are_refused_whole() -> None:
    batch = CopyBatch()
    good = Reading("a", "d", "m", T0, 1.0)
    for bad in (
        good._replace(ts=1.5),
        good._replace(metric=None),
        good._replace(value="x"),
        good._replace(quality=1 << 20),
    ):
        with pytest.raises((TypeError, ValueError)):
            batch.add_readings([good, bad])  # type: ignore[list-item]
    assert batch.rows == 0
    assert b"".join(batch.chunks()) == COPY_HEADER + COPY_TRAILER


def test_large_batches_stream_in_bounded_chunks() -> None:
    readings = [
        Reading("acme", f"dev-{d:03d}", f"metric_{m}", T0 + i, float(i), 0, T0)
        for d in range(50)
        for m in range(20)
        for i in range(60)
    ]
    batch = CopyBatch()
    batch.add_readings(readings)
    chunks = list(batch.chunks())
    assert len(chunks) > 1
    assert all(len(c) < 2 << 20 for c in chunks)
    assert b"".join(chunks) == psycopg_copy_bytes(in_copy_order(readings))


def test_empty_batch_is_a_valid_copy_stream() -> None:
    assert b"".join(CopyBatch().chunks()) == psycopg_copy_bytes([])


def prepared(n: int) -> PreparedBatch:
    return PreparedBatch(CopyBatch(), [KafkaOffset("t", 0, n)])


def test_writer_thread_writes_in_submission_order_and_drains() -> None:
    written: list[int] = []
    gate = threading.Event()

    def write(batch: PreparedBatch) -> None:
        gate.wait(5)
        written.append(batch.offsets[0].next_offset)

    pipeline = BatchWriterThread(write)
    pipeline.submit(prepared(1))
    pipeline.submit(prepared(2))  # queued behind the first, which is still being written
    assert written == []
    gate.set()
    pipeline.submit(prepared(3))
    pipeline.drain()
    assert written == [1, 2, 3]
    pipeline.close()


def test_writer_thread_stops_writing_after_a_failure_and_reports_it() -> None:
    written: list[int] = []

    def write(batch: PreparedBatch) -> None:
        if batch.offsets[0].next_offset == 2:
            raise RuntimeError("database went away")
        written.append(batch.offsets[0].next_offset)

    pipeline = BatchWriterThread(write)
    pipeline.submit(prepared(1))
    pipeline.submit(prepared(2))
    with pytest.raises(RuntimeError, match="hot-store write failed"):
        pipeline.drain()
    with pytest.raises(RuntimeError):
        pipeline.submit(prepared(3))
    pipeline.close()
    # Nothing after the failed batch may commit: its offsets would skip the failed batch's rows.
    assert written == [1]
