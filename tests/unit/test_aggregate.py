"""The aggregate planner's arithmetic, without services: partials, their combination, rollups, gap filling."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pytest

from lake.rollups import ROLLUP_1M, rollup_readings
from query.aggregate import (
    AggregateQuery,
    QueryError,
    combine_partials,
    fill_gaps,
    finalize,
    raw_partials,
    rollup_partials,
)
from sensormine.reading import Reading, readings_to_table
from serving.query_params import check_aggs, iso_duration, parse_bucket
from tests.factories import DAY_US

AGGS = ("avg", "min", "max", "sum", "count", "first", "last", "stddev")
MIN_US = 60_000_000


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("30s", 30_000_000),
        ("1m", MIN_US),
        ("15m", 15 * MIN_US),
        ("1h", 60 * MIN_US),
        ("1d", 1440 * MIN_US),
        ("1w", 7 * 1440 * MIN_US),
        ("500ms", 500_000),
        ("PT5M", 5 * MIN_US),
        ("PT1H30M", 90 * MIN_US),
        ("P1D", 1440 * MIN_US),
        ("PT0.5S", 500_000),
        ("pt7m", 7 * MIN_US),
    ],
)
def test_bucket_widths(text: str, us: int) -> None:
    assert parse_bucket(text) == us
    assert parse_bucket(iso_duration(us)) == us


@pytest.mark.parametrize("text", ["", "1mo", "P1M", "P1Y", "PT", "0s", "-5m", "1.5m", "PT0.0001S", "five minutes"])
def test_bad_bucket_widths_say_what_to_use(text: str) -> None:
    with pytest.raises(QueryError, match=r"(ISO-8601|positive)"):
        parse_bucket(text)


def test_aggs_are_checked_and_deduplicated() -> None:
    assert check_aggs(None) == ("avg",)
    assert check_aggs(["max,min", "max", " COUNT "]) == ("max", "min", "count")
    with pytest.raises(QueryError, match="choose from"):
        check_aggs(["median"])


def random_points(seed: int, n: int = 3000) -> pl.DataFrame:
    rng = random.Random(seed)
    keys = {
        (rng.choice(["d1", "d2"]), rng.choice(["temp", "rpm"]), DAY_US + rng.randrange(0, 6 * 3600 * 1_000_000))
        for _ in range(n)
    }
    rows = [(d, m, ts, rng.uniform(-50, 150)) for d, m, ts in sorted(keys)]
    return pl.DataFrame(rows, schema=["device_id", "metric", "ts", "value"], orient="row")


def duckdb_reference(points: pl.DataFrame, width_us: int) -> dict[tuple, tuple]:
    con = duckdb.connect()
    con.register("p", points.to_arrow())
    rows = con.sql(
        f"""SELECT device_id, metric, (ts // {width_us}) * {width_us}, avg(value), min(value), max(value),
                   sum(value), count(*), arg_min(value, ts), arg_max(value, ts), stddev_samp(value)
            FROM p GROUP BY ALL"""
    ).fetchall()
    return {(r[0], r[1], r[2]): r[3:] for r in rows}


def as_dict(frame: pl.DataFrame) -> dict[tuple, tuple]:
    out = {}
    for row in frame.with_columns(pl.col("bucket").dt.epoch("us")).iter_rows(named=True):
        out[(row["device_id"], row["metric"], row["bucket"])] = tuple(row[a] for a in AGGS)
    return out


def assert_same(got: dict[tuple, tuple], want: dict[tuple, tuple]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        for agg, g, w in zip(AGGS, got[k], want[k], strict=True):
            if w is None or (isinstance(w, float) and math.isnan(w)):
                assert g is None, (k, agg)
            else:
                assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-7), (k, agg, g, w)


@pytest.mark.parametrize("width_us", [MIN_US, 7 * MIN_US, 90_000_000, 3600 * 1_000_000])
def test_partials_split_across_sources_combine_exactly(width_us: int) -> None:
    points = random_points(width_us)
    rng = random.Random(1)
    source = pl.Series([rng.randrange(3) for _ in range(points.height)])
    parts = [raw_partials(points.filter(source == i), width_us) for i in range(3)]
    combined = finalize(combine_partials(pl.concat(parts)), AGGS)
    assert_same(as_dict(combined), duckdb_reference(points, width_us))


def test_rollup_partials_combine_into_coarser_buckets() -> None:
    points = random_points(5)
    readings = readings_to_table(
        [Reading("acme", d, m, ts, v, 0, ts) for d, m, ts, v in points.iter_rows()]  # type: ignore[arg-type]
    )
    rollup = pl.from_arrow(rollup_readings(readings, timedelta(minutes=1)))
    assert isinstance(rollup, pl.DataFrame)
    width = 15 * MIN_US
    combined = finalize(combine_partials(rollup_partials(rollup, width, ROLLUP_1M)), AGGS[:-1])
    want = {k: v[:-1] for k, v in duckdb_reference(points, width).items()}
    got = {k: v[:-1] for k, v in as_dict(combined.with_columns(stddev=pl.lit(None))).items()}
    assert got.keys() == want.keys()
    for k in want:
        for g, w in zip(got[k], want[k], strict=True):
            assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-7)


def query(fill: str, aggs: tuple[str, ...] = ("avg", "count")) -> AggregateQuery:
    start = datetime(2026, 11, 26, 0, 30, tzinfo=UTC)
    return AggregateQuery("acme", ("d1",), None, start, start + timedelta(hours=7), 3600 * 1_000_000, aggs, fill)


def sparse() -> pl.DataFrame:
    # buckets (hours) 1 and 4 hold data; the range covers hours 0..7
    rows = [("d1", "m", DAY_US + 3600_000_000 + 5, 10.0), ("d1", "m", DAY_US + 4 * 3600_000_000, 40.0)]
    points = pl.DataFrame(rows, schema=["device_id", "metric", "ts", "value"], orient="row")
    return finalize(combine_partials(raw_partials(points, 3600 * 1_000_000)), ("avg", "count"))


@pytest.mark.parametrize(
    ("fill", "avgs"),
    [
        ("none", [10.0, 40.0]),
        ("null", [None, 10.0, None, None, 40.0, None, None, None]),
        ("previous", [None, 10.0, 10.0, 10.0, 40.0, 40.0, 40.0, 40.0]),
        ("linear", [None, 10.0, 20.0, 30.0, 40.0, None, None, None]),
    ],
)
def test_gap_filling_modes(fill: str, avgs: list[float | None]) -> None:
    out = fill_gaps(sparse(), query(fill))
    assert out["avg"].to_list() == avgs
    counts = out["count"].to_list()
    assert counts == [1, 1] if fill == "none" else counts == [0, 1, 0, 0, 1, 0, 0, 0]
    if fill != "none":
        assert out["bucket"][0] == datetime(2026, 11, 26, tzinfo=UTC)  # the bucket holding start
