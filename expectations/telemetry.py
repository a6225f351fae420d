"""The data-quality suite of one telemetry tenant-day partition (long-format readings).

Four checks, each made of Great Expectations expectations:

| check | expectations |
|---|---|
| `keys_not_null` | tenant_id, device_id, metric and ts are never null |
| `rows_in_partition` | ts inside the partition's UTC day [00:00, 24:00); tenant_id is the partition's tenant |
| `values_in_schema_range` | value within the min/max its device schema declares for the metric |
| `dedupe_key_unique` | (tenant_id, device_id, metric, ts) occurs once |

Ranges come from `sensormine.schemas.ranges.metric_ranges`; they are joined onto the frame as
`range_min` / `range_max` columns (null where nothing is declared, and such rows are not held to
a bound), so the failing rows' sample shows each value beside its range.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING

from expectations.results import SuiteResult
from expectations.suite import ExpectationSpec, Suite, SuiteBatch, run_suite, to_frame
from sensormine.schemas.ranges import MetricRange

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

KEY_COLUMNS = ("tenant_id", "device_id", "metric", "ts")
"""The dedupe identity of a reading."""

RANGE_MIN = "range_min"
_EITHER_MISSING = "either_value_is_missing"
RANGE_MAX = "range_max"
SAMPLE_COLUMNS = (*KEY_COLUMNS, "value", RANGE_MIN, RANGE_MAX, "quality", "ingest_ts")

KEYS_NOT_NULL = "keys_not_null"
ROWS_IN_PARTITION = "rows_in_partition"
VALUES_IN_SCHEMA_RANGE = "values_in_schema_range"
DEDUPE_KEY_UNIQUE = "dedupe_key_unique"

CHECK_DESCRIPTIONS: dict[str, str] = {
    KEYS_NOT_NULL: "No reading has a null tenant_id, device_id, metric or ts.",
    ROWS_IN_PARTITION: "Every reading's ts lies inside the partition's UTC day and its tenant_id is the partition's.",
    VALUES_IN_SCHEMA_RANGE: "Every value lies within the minimum/maximum its device's schema declares for the metric.",
    DEDUPE_KEY_UNIQUE: "The dedupe key (tenant_id, device_id, metric, ts) occurs at most once.",
}
"""The suite's checks, in order, with what each asserts."""


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a UTC day as aware datetimes."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def telemetry_partition_suite(tenant_id: str, day: date) -> Suite:
    """The suite for the tenant-day partition (tenant_id, day)."""
    start, end = day_bounds(day)
    not_null = [
        ExpectationSpec(
            f"{column}_not_null",
            KEYS_NOT_NULL,
            "ExpectColumnValuesToNotBeNull",
            {"column": column},
            f"{column} is never null",
        )
        for column in KEY_COLUMNS
    ]
    return Suite(
        name="telemetry_partition",
        expectations=(
            *not_null,
            ExpectationSpec(
                "ts_in_day",
                ROWS_IN_PARTITION,
                "ExpectColumnValuesToBeBetween",
                {"column": "ts", "min_value": start, "max_value": end, "strict_max": True},
                f"ts in [{start.isoformat()}, {end.isoformat()})",
            ),
            ExpectationSpec(
                "tenant_is_partition_tenant",
                ROWS_IN_PARTITION,
                "ExpectColumnValuesToBeInSet",
                {"column": "tenant_id", "value_set": [tenant_id]},
                f"tenant_id is {tenant_id!r}",
            ),
            # Rows without a declared bound have a null range column and are left out.
            ExpectationSpec(
                "value_at_least_min",
                VALUES_IN_SCHEMA_RANGE,
                "ExpectColumnPairValuesAToBeGreaterThanB",
                {"column_A": "value", "column_B": RANGE_MIN, "or_equal": True, "ignore_row_if": _EITHER_MISSING},
                "value >= the schema's minimum for its device and metric",
            ),
            ExpectationSpec(
                "value_at_most_max",
                VALUES_IN_SCHEMA_RANGE,
                "ExpectColumnPairValuesAToBeGreaterThanB",
                {"column_A": RANGE_MAX, "column_B": "value", "or_equal": True, "ignore_row_if": _EITHER_MISSING},
                "value <= the schema's maximum for its device and metric",
            ),
            ExpectationSpec(
                "dedupe_key_unique",
                DEDUPE_KEY_UNIQUE,
                "ExpectCompoundColumnsToBeUnique",
                {"column_list": list(KEY_COLUMNS)},
                "(tenant_id, device_id, metric, ts) is unique",
            ),
        ),
        sample_columns=SAMPLE_COLUMNS,
    )


def prepare_frame(
    data: pa.Table | pd.DataFrame, ranges: Mapping[str, Mapping[str, MetricRange]] | None = None
) -> pd.DataFrame:
    """The partition as the suite validates it: ts as UTC timestamps, plus range_min/range_max columns.

    `ranges` maps device id -> metric -> inclusive (min, max), as `metric_ranges` returns it.
    Row order is kept, so failing rows' positions are positions in `data`.
    """
    import pandas as pd

    frame = to_frame(data)
    if "ts" in frame.columns:
        # Naive timestamps are UTC (the lake's convention); text or objects are parsed.
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    if "value" in frame.columns:
        frame["value"] = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    rows = [
        (device_id, metric, lo, hi)
        for device_id, metrics in (ranges or {}).items()
        for metric, (lo, hi) in metrics.items()
        if lo is not None or hi is not None
    ]
    if rows and {"device_id", "metric"} <= set(frame.columns):
        table = pd.DataFrame(rows, columns=["device_id", "metric", RANGE_MIN, RANGE_MAX])
        table[[RANGE_MIN, RANGE_MAX]] = table[[RANGE_MIN, RANGE_MAX]].astype("float64")
        # Match the frame's key dtypes so the join does not fail on string flavours.
        table = table.astype({"device_id": frame["device_id"].dtype, "metric": frame["metric"].dtype})
        frame = frame.merge(table, on=["device_id", "metric"], how="left", sort=False)
    else:
        frame[RANGE_MIN] = pd.Series(float("nan"), index=frame.index, dtype="float64")
        frame[RANGE_MAX] = pd.Series(float("nan"), index=frame.index, dtype="float64")
    return frame


def telemetry_batch(
    data: pa.Table | pd.DataFrame,
    tenant_id: str,
    day: date,
    ranges: Mapping[str, Mapping[str, MetricRange]] | None = None,
) -> SuiteBatch:
    """The telemetry suite of (tenant_id, day) with its prepared frame, ready for `run_suite`."""
    return SuiteBatch(
        suite=telemetry_partition_suite(tenant_id, day),
        frame=prepare_frame(data, ranges),
        metadata={"tenant_id": tenant_id, "date": day.isoformat()},
    )


def validate_telemetry_partition(
    data: pa.Table | pd.DataFrame,
    tenant_id: str,
    day: date,
    ranges: Mapping[str, Mapping[str, MetricRange]] | None = None,
) -> SuiteResult:
    """Validate one tenant-day partition of readings (Arrow table or pandas frame) with the suite."""
    batch = telemetry_batch(data, tenant_id, day, ranges)
    return run_suite(batch.suite, batch.frame)
