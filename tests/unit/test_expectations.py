"""The telemetry partition suite (real Great Expectations validation) and its Dagster check builder."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import pandas as pd
import pyarrow as pa

from expectations.checks import SuiteCheck, build_suite_checks, suite_check_results
from expectations.results import SAMPLE_LIMIT
from expectations.suite import ExpectationSpec, Suite, SuiteBatch, run_suite
from expectations.telemetry import (
    CHECK_DESCRIPTIONS,
    DEDUPE_KEY_UNIQUE,
    KEYS_NOT_NULL,
    ROWS_IN_PARTITION,
    VALUES_IN_SCHEMA_RANGE,
    telemetry_batch,
    validate_telemetry_partition,
)
from sensormine.reading import Reading, readings_to_table
from sensormine.schemas.ranges import schema_ranges
from tests.factories import DAY, DAY_US, readings

D = DAY.date()
HOUR_US = 3_600_000_000
RANGES = {"d1": {"temperature": (-10.0, 50.0), "pressure": (None, 2.0)}}


def good_rows() -> list[Reading]:
    """Two devices, two metrics, 10 hourly readings each on day D; values 0.0 .. 9.1 (pressure 0.1 .. 0.x)."""
    rows = readings("acme", "d1", 10, step_us=HOUR_US) + readings("acme", "d2", 10, step_us=HOUR_US)
    # pressure of d1 must stay <= 2.0: scale it down.
    return [r._replace(value=r.value / 10) if r.metric == "pressure" else r for r in rows]


def frame(rows: list[Reading]) -> pd.DataFrame:
    """The rows as a pandas frame (a plain copy, so tests may put nulls in)."""
    return readings_to_table(rows).to_pandas()


def failing(result, name):  # type: ignore[no-untyped-def]
    outcome = result.outcome(name)
    assert not outcome.success, f"{name} should fail"
    return outcome


def test_good_partition_passes_every_expectation() -> None:
    result = validate_telemetry_partition(readings_to_table(good_rows()), "acme", D, RANGES)

    assert result.passed
    assert result.row_count == 40
    assert result.failed == []
    assert result.unexpected_count == 0
    assert result.failing_rows() == []
    assert [o.name for o in result.outcomes] == [
        "tenant_id_not_null",
        "device_id_not_null",
        "metric_not_null",
        "ts_not_null",
        "ts_in_day",
        "tenant_is_partition_tenant",
        "value_at_least_min",
        "value_at_most_max",
        "dedupe_key_unique",
    ]
    assert {o.check for o in result.outcomes} == set(CHECK_DESCRIPTIONS)
    assert all(o.element_count == 40 and o.error is None for o in result.outcomes)
    assert result.outcome("dedupe_key_unique").expectation_type == "expect_compound_columns_to_be_unique"


def test_empty_partition_passes() -> None:
    empty = readings_to_table([])
    result = validate_telemetry_partition(empty, "acme", D, RANGES)
    assert result.passed
    assert result.row_count == 0


def test_null_keys_fail_with_the_null_rows() -> None:
    df = frame(good_rows())
    df.loc[3, "device_id"] = None
    df.loc[7, "ts"] = None
    df.loc[8, "metric"] = None

    result = validate_telemetry_partition(df, "acme", D, RANGES)

    assert not result.passed
    assert result.failed == ["device_id_not_null", "metric_not_null", "ts_not_null"]
    device = failing(result, "device_id_not_null")
    assert (device.unexpected_count, device.check) == (1, KEYS_NOT_NULL)
    [row] = device.failing_rows
    assert row["row"] == 3
    assert row["device_id"] is None
    assert (row["metric"], row["ts"]) == ("pressure", "2026-11-26T01:00:00+00:00")
    assert [r["row"] for r in failing(result, "ts_not_null").failing_rows] == [7]
    assert [r["row"] for r in failing(result, "metric_not_null").failing_rows] == [8]
    # Merged per check: one entry per row, naming what it broke.
    sample = result.for_check(KEYS_NOT_NULL).failing_rows()
    assert [(r["row"], r["failed"]) for r in sample] == [
        (3, "device_id_not_null"),
        (7, "ts_not_null"),
        (8, "metric_not_null"),
    ]
    assert result.for_check(KEYS_NOT_NULL).unexpected_count == 3
    assert result.for_check(ROWS_IN_PARTITION).passed
    assert result.for_check(DEDUPE_KEY_UNIQUE).passed


def test_timestamps_outside_the_utc_day_fail() -> None:
    rows = good_rows()
    rows[5] = rows[5]._replace(ts=DAY_US + 24 * HOUR_US)  # next midnight: the end is exclusive
    rows[9] = rows[9]._replace(ts=DAY_US - 1)  # one microsecond before the day
    rows[0] = rows[0]._replace(ts=DAY_US)  # midnight itself is inside

    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)

    assert result.failed == ["ts_in_day"]
    outcome = failing(result, "ts_in_day")
    assert outcome.check == ROWS_IN_PARTITION
    assert outcome.unexpected_count == 2
    assert [(r["row"], r["ts"]) for r in outcome.failing_rows] == [
        (5, "2026-11-27T00:00:00+00:00"),
        (9, "2026-11-25T23:59:59.999999+00:00"),
    ]


def test_rows_of_another_tenant_fail() -> None:
    rows = good_rows()
    rows[2] = rows[2]._replace(tenant_id="globex")
    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)
    assert result.failed == ["tenant_is_partition_tenant"]
    [row] = failing(result, "tenant_is_partition_tenant").failing_rows
    assert (row["row"], row["tenant_id"]) == (2, "globex")


def test_values_outside_the_schema_ranges_fail_and_show_the_range() -> None:
    rows = good_rows()
    rows[0] = rows[0]._replace(value=-10.0)  # d1 temperature: the bounds themselves are allowed
    rows[2] = rows[2]._replace(value=50.0)
    rows[4] = rows[4]._replace(value=-10.5)  # below min
    rows[6] = rows[6]._replace(value=50.25)  # above max
    rows[7] = rows[7]._replace(value=2.5)  # d1 pressure above its max (no min declared)
    rows[25] = rows[25]._replace(value=1e9)  # d2 has no schema: nothing bounds it

    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)

    assert result.failed == ["value_at_least_min", "value_at_most_max"]
    low = failing(result, "value_at_least_min")
    assert low.check == VALUES_IN_SCHEMA_RANGE
    assert [(r["row"], r["device_id"], r["metric"], r["value"], r["range_min"]) for r in low.failing_rows] == [
        (4, "d1", "temperature", -10.5, -10.0)
    ]
    high = failing(result, "value_at_most_max")
    assert high.unexpected_count == 2
    assert [(r["row"], r["metric"], r["value"], r["range_max"]) for r in high.failing_rows] == [
        (6, "temperature", 50.25, 50.0),
        (7, "pressure", 2.5, 2.0),
    ]
    assert [r["row"] for r in result.for_check(VALUES_IN_SCHEMA_RANGE).failing_rows()] == [4, 6, 7]


def test_without_ranges_no_value_is_out_of_range() -> None:
    rows = [r._replace(value=-1e12) for r in good_rows()]
    assert validate_telemetry_partition(readings_to_table(rows), "acme", D, {}).passed
    assert validate_telemetry_partition(readings_to_table(rows), "acme", D, None).passed


def test_exclusive_bounds_from_a_schema() -> None:
    schema = {
        "properties": {
            "values": {
                "properties": {
                    "temperature": {"type": "number", "exclusiveMinimum": 0, "maximum": 50},
                    "pressure": {"type": "number", "minimum": 1, "exclusiveMinimum": True},  # draft 4 spelling
                    "humidity": {"type": "number"},
                }
            }
        }
    }
    ranges = schema_ranges(schema)
    assert ranges["temperature"] == (math.nextafter(0.0, math.inf), 50.0)
    assert ranges["pressure"] == (math.nextafter(1.0, math.inf), None)
    assert ranges["humidity"] == (None, None)

    rows = [
        Reading("acme", "d1", "temperature", DAY_US, 0.0),  # at the exclusive minimum: out
        Reading("acme", "d1", "temperature", DAY_US + 1, 5e-324),  # just above it: in
        Reading("acme", "d1", "pressure", DAY_US, 1.0),  # at the exclusive minimum: out
        Reading("acme", "d1", "pressure", DAY_US + 1, 1.0000001),
    ]
    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, {"d1": ranges})
    assert result.failed == ["value_at_least_min"]
    assert [r["row"] for r in result.outcome("value_at_least_min").failing_rows] == [0, 2]


def test_duplicate_dedupe_keys_fail_with_every_copy() -> None:
    rows = good_rows()
    rows.append(rows[3]._replace(value=1.5))  # same key, different value

    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)

    assert result.failed == ["dedupe_key_unique"]
    outcome = failing(result, "dedupe_key_unique")
    assert outcome.check == DEDUPE_KEY_UNIQUE
    assert outcome.unexpected_count == 2
    assert [(r["row"], r["value"]) for r in outcome.failing_rows] == [(3, rows[3].value), (40, 1.5)]


def test_failing_rows_are_capped_at_twenty() -> None:
    rows = [r._replace(value=99.0) if r.device_id == "d1" and r.metric == "temperature" else r for r in good_rows()]
    rows += [
        Reading("acme", "d1", "temperature", DAY_US + HOUR_US * 10 + i, 99.0, 0, DAY_US) for i in range(25)
    ]  # 35 too high in all
    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)
    outcome = failing(result, "value_at_most_max")
    assert outcome.unexpected_count == 35
    assert len(outcome.failing_rows) == SAMPLE_LIMIT
    assert len(result.failing_rows()) == SAMPLE_LIMIT
    assert [r["row"] for r in outcome.failing_rows] == sorted(r["row"] for r in outcome.failing_rows)


def test_arrow_and_pandas_inputs_agree() -> None:
    rows = good_rows()
    rows[1] = rows[1]._replace(value=1000.0)
    from_arrow = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)
    from_pandas = validate_telemetry_partition(frame(rows), "acme", D, RANGES)
    assert from_arrow == from_pandas
    # Naive timestamps are taken as UTC.
    naive = frame(rows)
    naive["ts"] = naive["ts"].dt.tz_localize(None)
    assert validate_telemetry_partition(naive, "acme", D, RANGES) == from_arrow


def test_an_expectation_that_cannot_run_fails_with_its_error() -> None:
    suite = Suite(
        "broken",
        (ExpectationSpec("no_such_column_not_null", "c", "ExpectColumnValuesToNotBeNull", {"column": "nope"}),),
    )
    result = run_suite(suite, pa.table({"a": [1, 2]}))
    assert not result.passed
    outcome = result.outcome("no_such_column_not_null")
    assert outcome.error and "nope" in outcome.error


def test_check_results_carry_the_sample_as_metadata() -> None:
    rows = good_rows()
    rows[4] = rows[4]._replace(value=-11.0)
    result = validate_telemetry_partition(readings_to_table(rows), "acme", D, RANGES)
    checks = [SuiteCheck(n, d) for n, d in CHECK_DESCRIPTIONS.items()]
    key = dg.AssetKey(["lake", "telemetry"])

    by_name = {r.check_name: r for r in suite_check_results(key, checks, result, {"tenant_id": "acme"})}

    assert {n: r.passed for n, r in by_name.items()} == {
        KEYS_NOT_NULL: True,
        ROWS_IN_PARTITION: True,
        VALUES_IN_SCHEMA_RANGE: False,
        DEDUPE_KEY_UNIQUE: True,
    }
    bad = by_name[VALUES_IN_SCHEMA_RANGE]
    assert bad.severity == dg.AssetCheckSeverity.ERROR
    assert bad.metadata["unexpected_count"].value == 1
    assert bad.metadata["failed_expectations"].value == "value_at_least_min"
    assert bad.metadata["tenant_id"].value == "acme"
    table = bad.metadata["failing_rows"].value
    assert [dict(rec.data) for rec in table.records] == [
        {
            "row": 4,
            "tenant_id": "acme",
            "device_id": "d1",
            "metric": "temperature",
            "ts": "2026-11-26T02:00:00+00:00",
            "value": -11.0,
            "range_min": -10.0,
            "range_max": 50.0,
            "quality": 0,
            "ingest_ts": DAY.isoformat(),
            "failed": "value_at_least_min",
        }
    ]
    assert "failing_rows" not in by_name[KEYS_NOT_NULL].metadata
    assert "1 unexpected row(s) of 40" in (bad.description or "")


@dg.asset
def readings_asset() -> None:
    """Stands in for a table the checks read through their loader."""


def test_built_checks_run_with_their_asset_and_block_downstream() -> None:
    data: dict[str, pa.Table] = {}

    def loader(context: dg.AssetCheckExecutionContext) -> SuiteBatch:
        return telemetry_batch(data["table"], "acme", D, RANGES)

    checks = build_suite_checks(
        readings_asset,
        [SuiteCheck(n, d, blocking=(n != DEDUPE_KEY_UNIQUE)) for n, d in CHECK_DESCRIPTIONS.items()],
        loader,
        name="readings_suite",
    )
    ran: list[str] = []

    @dg.asset(deps=[readings_asset])
    def downstream() -> None:
        ran.append("downstream")

    data["table"] = readings_to_table(good_rows())
    ok = dg.materialize([readings_asset, checks, downstream], raise_on_error=False)
    assert ok.success
    assert sorted((e.check_name, e.passed) for e in ok.get_asset_check_evaluations()) == sorted(
        (n, True) for n in CHECK_DESCRIPTIONS
    )
    assert ran == ["downstream"]

    # A non-blocking check failing (WARN) lets downstream run; a blocking one stops it.
    rows = good_rows()
    data["table"] = readings_to_table([*rows, rows[0]])
    warned = dg.materialize([readings_asset, checks, downstream], raise_on_error=False)
    assert warned.success
    [dup] = [e for e in warned.get_asset_check_evaluations() if not e.passed]
    assert (dup.check_name, dup.severity) == (DEDUPE_KEY_UNIQUE, dg.AssetCheckSeverity.WARN)
    assert ran == ["downstream", "downstream"]

    data["table"] = readings_to_table([rows[0]._replace(ts=DAY_US + 25 * HOUR_US), *rows[1:]])
    blocked = dg.materialize([readings_asset, checks, downstream], raise_on_error=False)
    assert not blocked.success
    [bad] = [e for e in blocked.get_asset_check_evaluations() if not e.passed]
    assert bad.check_name == ROWS_IN_PARTITION
    assert [r.data["row"] for r in bad.metadata["failing_rows"].value.records] == [0]
    assert ran == ["downstream", "downstream"]
    assert blocked.asset_materializations_for_node("downstream") == []


def test_day_bounds_follow_the_partition_day() -> None:
    other = date(2026, 3, 29)  # a DST change in Europe: irrelevant, bounds are UTC
    start = datetime(2026, 3, 29, tzinfo=UTC)
    rows = [
        Reading("acme", "d1", "temperature", int(start.timestamp() * 1e6), 1.0),
        Reading("acme", "d1", "temperature", int((start + timedelta(hours=23, minutes=59)).timestamp() * 1e6), 1.0),
    ]
    assert validate_telemetry_partition(readings_to_table(rows), "acme", other, {}).passed
    assert validate_telemetry_partition(readings_to_table(rows), "acme", D, {}).failed == ["ts_in_day"]
