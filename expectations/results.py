"""What a suite run reports: per-expectation outcomes and a small sample of the failing rows.

Plain data (no Great Expectations or Dagster objects), so results can be logged, asserted on in
tests, and turned into Dagster check metadata without importing either library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SAMPLE_LIMIT = 20
"""Most failing rows kept per expectation, and per merged sample."""

ROW_FIELD = "row"
"""Key of a failing row's position in the validated frame (0-based)."""

FAILED_FIELD = "failed"
"""Key, in merged samples, of the expectations a row failed (comma-separated names)."""

FailingRow = Mapping[str, Any]
"""One failing row: its position under ROW_FIELD, then the sampled columns as JSON-friendly values."""


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation of a suite run."""

    name: str
    """The expectation's name in its suite, e.g. `device_id_not_null`."""
    check: str
    """The check it belongs to (a Dagster asset check groups one or more expectations)."""
    expectation_type: str
    """Great Expectations' type, e.g. `expect_column_values_to_not_be_null`."""
    description: str
    success: bool
    element_count: int
    """Rows the expectation looked at."""
    unexpected_count: int
    """Rows that failed it (for a uniqueness expectation, every row of a duplicated key)."""
    failing_rows: tuple[FailingRow, ...] = ()
    """Up to SAMPLE_LIMIT failing rows, in frame order."""
    error: str | None = None
    """Why the expectation could not be evaluated (it then counts as failed), or None."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary without the sample."""
        return {
            "name": self.name,
            "check": self.check,
            "type": self.expectation_type,
            "success": self.success,
            "element_count": self.element_count,
            "unexpected_count": self.unexpected_count,
            "error": self.error,
        }


def merge_samples(outcomes: Iterable[ExpectationOutcome], limit: int = SAMPLE_LIMIT) -> list[dict[str, Any]]:
    """The failing rows of several outcomes, one entry per row (by position), naming what each failed.

    Rows are in frame order; at most `limit` of them.
    """
    merged: dict[int, dict[str, Any]] = {}
    failed: dict[int, list[str]] = {}
    for outcome in outcomes:
        for row in outcome.failing_rows:
            position = int(row[ROW_FIELD])
            merged.setdefault(position, dict(row))
            failed.setdefault(position, []).append(outcome.name)
    out = []
    for position in sorted(merged)[:limit]:
        out.append({**merged[position], FAILED_FIELD: ", ".join(failed[position])})
    return out


@dataclass(frozen=True)
class SuiteResult:
    """The result of validating one batch (e.g. one tenant-day partition) against a suite."""

    suite: str
    row_count: int
    outcomes: tuple[ExpectationOutcome, ...]

    @property
    def passed(self) -> bool:
        """Whether every expectation succeeded."""
        return all(o.success for o in self.outcomes)

    @property
    def unexpected_count(self) -> int:
        """Failing rows summed over expectations (a row failing two expectations counts twice)."""
        return sum(o.unexpected_count for o in self.outcomes)

    @property
    def failed(self) -> list[str]:
        """Names of the expectations that failed, in suite order."""
        return [o.name for o in self.outcomes if not o.success]

    def outcome(self, name: str) -> ExpectationOutcome:
        """The outcome of the expectation called `name`."""
        for o in self.outcomes:
            if o.name == name:
                return o
        raise KeyError(name)

    def for_check(self, check: str) -> SuiteResult:
        """The part of this result that belongs to one check."""
        return SuiteResult(self.suite, self.row_count, tuple(o for o in self.outcomes if o.check == check))

    def failing_rows(self, limit: int = SAMPLE_LIMIT) -> list[dict[str, Any]]:
        """A sample of at most `limit` failing rows, each naming the expectations it failed."""
        return merge_samples(self.outcomes, limit)
