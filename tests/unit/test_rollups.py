"""Rollup arithmetic checked against DuckDB computing the same buckets independently."""

from __future__ import annotations

import random
from datetime import timedelta

import duckdb
import pyarrow as pa
import pytest

from lake.rollups import ROLLUP_SCHEMA, rollup_readings, rollup_rollups
from sensormine.reading import Reading, readings_to_table
from tests.factories import DAY_US

MINUTE_US = 60_000_000


def random_readings(seed: int, n: int = 5000) -> pa.Table:
    rng = random.Random(seed)
    rows = {
        (dev, metric, DAY_US + rng.randrange(0, 3 * 3600 * 1_000_000))
        for dev, metric in ((rng.choice(["d1", "d2", "d3"]), rng.choice(["temp", "rpm"])) for _ in range(n))
    }
    return readings_to_table(
        [Reading("acme", d, m, ts, rng.uniform(-50, 150), 0, ts + 1000) for d, m, ts in sorted(rows)]
    )


def reference(readings: pa.Table, seconds: int) -> pa.Table:
    """The same statistics computed by DuckDB, bucketing on epoch microseconds (no time zone involved)."""
    con = duckdb.connect()
    con.register("r", readings)
    return con.sql(
        f"""
        SELECT tenant_id, device_id, metric,
               make_timestamp((epoch_us(ts) // {seconds * 1_000_000}) * {seconds * 1_000_000}) AS bucket,
               count(*) AS count, min(value) AS min, max(value) AS max, sum(value) AS sum,
               arg_min(value, ts) AS first, arg_max(value, ts) AS last
        FROM r GROUP BY ALL ORDER BY tenant_id, device_id, metric, bucket
        """
    ).to_arrow_table()


@pytest.mark.parametrize("seconds", [60, 3600])
def test_rollup_of_readings_matches_duckdb(seconds: int) -> None:
    raw = random_readings(seconds)
    got = rollup_readings(raw, timedelta(seconds=seconds))
    want = reference(raw, seconds)
    assert got.schema == ROLLUP_SCHEMA
    assert got.num_rows == want.num_rows > 10
    assert got["bucket"].cast(pa.timestamp("us")).to_pylist() == want["bucket"].to_pylist()
    for col in ("tenant_id", "device_id", "metric", "count", "min", "max", "first", "last"):
        assert got[col].to_pylist() == want[col].to_pylist(), col
    assert got["sum"].to_pylist() == pytest.approx(want["sum"].to_pylist(), rel=1e-12)
    avg = [s / c for s, c in zip(want["sum"].to_pylist(), want["count"].to_pylist(), strict=True)]
    assert got["avg"].to_pylist() == pytest.approx(avg, rel=1e-12)
    assert got["date"].to_pylist() == [b.date() for b in want["bucket"].to_pylist()]


def test_hourly_from_minutes_equals_hourly_from_readings() -> None:
    raw = random_readings(7)
    direct = rollup_readings(raw, timedelta(hours=1))
    combined = rollup_rollups(rollup_readings(raw, timedelta(minutes=1)), timedelta(hours=1))
    for col in ("tenant_id", "device_id", "metric", "bucket", "count", "min", "max", "first", "last", "date"):
        assert combined[col].to_pylist() == direct[col].to_pylist(), col
    assert combined["avg"].to_pylist() == pytest.approx(direct["avg"].to_pylist(), rel=1e-12)


def test_empty_input_gives_empty_rollup() -> None:
    assert rollup_readings(readings_to_table([]), timedelta(minutes=1)).num_rows == 0
    assert rollup_rollups(ROLLUP_SCHEMA.empty_table(), timedelta(hours=1)).schema == ROLLUP_SCHEMA


def test_bucket_boundaries_are_half_open() -> None:
    ts = [DAY_US, DAY_US + MINUTE_US - 1, DAY_US + MINUTE_US]
    raw = readings_to_table([Reading("acme", "d1", "m", t, float(i), 0, t) for i, t in enumerate(ts)])
    got = rollup_readings(raw, timedelta(minutes=1))
    assert got["count"].to_pylist() == [2, 1]
    assert got["first"].to_pylist() == [0.0, 2.0]
    assert got["last"].to_pylist() == [1.0, 2.0]
