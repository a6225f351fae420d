"""Suites as plain data, validated with Great Expectations on a pandas frame.

A `Suite` names its expectations and says which check each belongs to; it holds the class name
and arguments of each Great Expectations expectation rather than the object, so building or
importing a suite never imports Great Expectations (whose import takes seconds). `run_suite`
imports it, validates the frame in an ephemeral context through a pandas dataframe datasource,
and returns a `SuiteResult` with a sample of the failing rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from expectations.results import ROW_FIELD, SAMPLE_LIMIT, ExpectationOutcome, SuiteResult

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


@dataclass(frozen=True)
class ExpectationSpec:
    """One expectation of a suite: a Great Expectations expectation class and its arguments."""

    name: str
    """Unique within the suite; names the outcome and the rows' `failed` field."""
    check: str
    """The check this expectation belongs to."""
    gx_type: str
    """Class name in `great_expectations.expectations`, e.g. `ExpectColumnValuesToNotBeNull`."""
    kwargs: Mapping[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Suite:
    """A named list of expectations over one frame."""

    name: str
    expectations: tuple[ExpectationSpec, ...]
    sample_columns: tuple[str, ...] | None = None
    """Columns shown for each failing row (all columns when None)."""

    def __post_init__(self) -> None:
        names = [e.name for e in self.expectations]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r} has duplicate expectation names: {names}")

    @property
    def checks(self) -> list[str]:
        """The check names of the suite's expectations, in first-seen order."""
        return list(dict.fromkeys(e.check for e in self.expectations))


@dataclass(frozen=True)
class SuiteBatch:
    """A suite with the frame it is to validate: what a check's loader hands to the builder."""

    suite: Suite
    frame: pd.DataFrame
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Extra facts about the batch (partition, table version, ...) for the check's metadata."""


def _import_gx() -> Any:
    """great_expectations, imported on first use with its usage analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def to_frame(data: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """A pandas frame with a 0..n-1 index (failing rows are reported by position)."""
    import pandas as pd

    frame = data if isinstance(data, pd.DataFrame) else data.to_pandas()
    if not isinstance(frame.index, pd.RangeIndex) or frame.index.start != 0 or frame.index.step != 1:
        frame = frame.reset_index(drop=True)
    return frame


def json_value(value: Any) -> str | int | float | bool | None:
    """A cell of a failing row as a JSON- and Dagster-table-friendly value."""
    import pandas as pd

    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, float):  # numpy.float64 too
        # NaN is how pandas spells a missing float (e.g. no range declared), so it shows as null.
        return None if math.isnan(value) else float(value) if math.isfinite(value) else str(float(value))
    if value is None or value is pd.NaT or (not isinstance(value, str | bytes) and _is_na(value)):
        return None
    if isinstance(value, pd.Timestamp | datetime | date):
        return value.isoformat()
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item"):  # numpy scalars
        return json_value(value.item())
    return str(value)


def _is_na(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _sample(frame: pd.DataFrame, positions: Sequence[Any], columns: Sequence[str]) -> tuple[dict[str, Any], ...]:
    rows = []
    for position in list(positions)[:SAMPLE_LIMIT]:
        if isinstance(position, bool) or not isinstance(position, int):
            continue  # an index GX could not express as a row position
        record = frame.iloc[position]
        rows.append({ROW_FIELD: position, **{c: json_value(record[c]) for c in columns}})
    return tuple(rows)


def _error(exception_info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    if not isinstance(exception_info, Mapping):
        return None
    if "raised_exception" in exception_info:
        if exception_info.get("raised_exception"):
            return str(exception_info.get("exception_message") or "expectation raised an exception")
        return None
    # Keyed by metric: one entry per metric that failed to compute.
    for info in exception_info.values():
        message = _error(info)
        if message:
            return message
    return None


def run_suite(suite: Suite, data: pa.Table | pd.DataFrame) -> SuiteResult:
    """Validate `data` against `suite` with Great Expectations; never raises for bad data.

    An expectation that cannot be evaluated (e.g. a missing column) fails, with its error.
    """
    gx = _import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    frame = to_frame(data)
    columns = [c for c in (suite.sample_columns or frame.columns) if c in frame.columns]

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(f"{suite.name}_source")
        .add_dataframe_asset(suite.name)
        .add_batch_definition_whole_dataframe(f"{suite.name}_frame")
    )
    gx_suite = gx.ExpectationSuite(
        name=suite.name,
        expectations=[
            getattr(gxe, spec.gx_type)(**spec.kwargs, meta={"name": spec.name}, description=spec.description or None)
            for spec in suite.expectations
        ],
    )
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    validation = batch.validate(
        gx_suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": SAMPLE_LIMIT}
    )
    by_name = {r.expectation_config.meta["name"]: r for r in validation.results}

    outcomes = []
    for spec in suite.expectations:
        gx_result = by_name.get(spec.name)
        if gx_result is None:
            error: str | None = "Great Expectations returned no result for this expectation"
            result: Mapping[str, Any] = {}
            success = False
            gx_type = spec.gx_type
        else:
            error = _error(gx_result.exception_info)
            result = gx_result.result or {}
            success = bool(gx_result.success) and error is None
            gx_type = gx_result.expectation_config.type
        outcomes.append(
            ExpectationOutcome(
                name=spec.name,
                check=spec.check,
                expectation_type=gx_type,
                description=spec.description,
                success=success,
                element_count=int(result.get("element_count") or len(frame)),
                unexpected_count=int(result.get("unexpected_count") or 0),
                failing_rows=_sample(frame, result.get("partial_unexpected_index_list") or [], columns),
                error=error,
            )
        )
    return SuiteResult(suite=suite.name, row_count=len(frame), outcomes=tuple(outcomes))
