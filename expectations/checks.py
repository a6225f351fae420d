"""Builders turning suites into Dagster asset checks, one check per group of expectations.

`build_suite_checks` makes one `@multi_asset_check` op that loads the batch once (through a
loader callable, so this package needs no knowledge of where data lives), runs the suite, and
reports one `AssetCheckResult` per check. A failing result carries the per-expectation outcomes
and a table of up to 20 failing rows as metadata, which the Dagster UI shows on the check.
"""

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from expectations.results import FAILED_FIELD, ROW_FIELD, SuiteResult
from expectations.suite import SuiteBatch, run_suite

Loader = Callable[[dg.AssetCheckExecutionContext], SuiteBatch]
"""Loads the batch a check validates, e.g. the partition `context.partition_key` names."""


@dataclass(frozen=True)
class SuiteCheck:
    """One Dagster asset check made of the suite expectations whose `check` is `name`."""

    name: str
    description: str
    blocking: bool = True
    """A failing blocking check (severity ERROR) stops assets downstream of the checked asset."""


def _cell_type(values: Sequence[Any]) -> str:
    kinds = {type(v) for v in values if v is not None}
    if kinds and kinds <= {int}:
        return "int"
    if kinds and kinds <= {int, float}:
        return "float"
    if kinds and kinds <= {bool}:
        return "bool"
    return "string"


def rows_table(rows: Sequence[Mapping[str, Any]]) -> dg.MetadataValue:
    """Failing rows as a Dagster table metadata value (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _cell_type([row.get(c) for row in rows])) for c in columns])
    records = [dg.TableRecord({c: row.get(c) for c in columns}) for row in rows]
    return dg.MetadataValue.table(records=records, schema=schema)


def outcomes_markdown(result: SuiteResult) -> str:
    """A markdown table of the expectations of a result: name, outcome, unexpected rows."""
    lines = ["| expectation | outcome | unexpected rows | of rows |", "|---|---|---|---|"]
    for o in result.outcomes:
        outcome = "passed" if o.success else ("error: " + o.error if o.error else "FAILED")
        lines.append(f"| {o.name} | {outcome} | {o.unexpected_count} | {o.element_count} |")
    return "\n".join(lines)


def check_result(
    asset_key: dg.AssetKey,
    check: SuiteCheck,
    result: SuiteResult,
    extra_metadata: Mapping[str, Any] | None = None,
) -> dg.AssetCheckResult:
    """The Dagster result of one check of a suite result (the expectations grouped under it)."""
    part = result.for_check(check.name)
    if not part.outcomes:
        raise ValueError(f"suite {result.suite!r} has no expectation for check {check.name!r}")
    rows = part.failing_rows()
    metadata: dict[str, Any] = {
        **(extra_metadata or {}),
        "row_count": result.row_count,
        "unexpected_count": part.unexpected_count,
        "failed_expectations": ", ".join(part.failed) or "none",
        "expectations": dg.MetadataValue.md(outcomes_markdown(part)),
        "outcomes": dg.MetadataValue.json([o.as_dict() for o in part.outcomes]),
    }
    if rows:
        metadata["failing_rows"] = rows_table(rows)
        metadata["failing_rows_shown"] = len(rows)
    if part.passed:
        description = f"{result.row_count} rows, all expectations passed"
    else:
        description = (
            f"{part.unexpected_count} unexpected row(s) of {result.row_count}; failed: {', '.join(part.failed)}. "
            f"See `failing_rows` (first {len(rows)}; `{ROW_FIELD}` is the row's position, "
            f"`{FAILED_FIELD}` the expectations it broke)."
        )
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=check.name,
        passed=part.passed,
        severity=dg.AssetCheckSeverity.ERROR if check.blocking else dg.AssetCheckSeverity.WARN,
        description=description,
        metadata=metadata,
    )


def suite_check_results(
    asset_key: dg.AssetKey,
    checks: Sequence[SuiteCheck],
    result: SuiteResult,
    extra_metadata: Mapping[str, Any] | None = None,
) -> list[dg.AssetCheckResult]:
    """One AssetCheckResult per check, e.g. to return from an asset that validates its own output."""
    return [check_result(asset_key, check, result, extra_metadata) for check in checks]


def suite_check_specs(
    asset_key: dg.AssetKey,
    checks: Sequence[SuiteCheck],
    partitions_def: dg.PartitionsDefinition | None = None,
) -> list[dg.AssetCheckSpec]:
    """Check specs of the checks; partitioned like the asset when `partitions_def` is given."""
    with warnings.catch_warnings():
        # Partitioned asset checks are a preview feature of Dagster 1.13 (docs/quality.md).
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(
                check.name,
                asset=asset_key,
                description=check.description,
                blocking=check.blocking,
                partitions_def=partitions_def,
            )
            for check in checks
        ]


def build_suite_checks(
    asset: dg.AssetKey | dg.AssetsDefinition,
    checks: Sequence[SuiteCheck],
    loader: Loader,
    *,
    name: str,
    partitions_def: dg.PartitionsDefinition | None = None,
    required_resource_keys: set[str] | None = None,
    description: str | None = None,
) -> dg.AssetChecksDefinition:
    """Asset checks for `asset` from a suite: one op loads the batch, runs the suite, reports each check.

    `loader(context)` returns the suite and frame to validate (for a partitioned asset, the
    partition `context.partition_key`); every check in `checks` must name expectations of
    that suite. With `partitions_def` (the asset's), each evaluation is recorded against the
    partition of the run, and the checks run in the same run as the materialisation, so a
    failing blocking check stops downstream assets of that run.
    """
    asset_key = asset if isinstance(asset, dg.AssetKey) else asset.key
    specs = suite_check_specs(asset_key, checks, partitions_def)

    @dg.multi_asset_check(
        name=name,
        specs=specs,
        description=description,
        required_resource_keys=required_resource_keys or set(),
        compute_kind="great_expectations",
    )
    def _suite_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        batch = loader(context)
        result = run_suite(batch.suite, batch.frame)
        context.log.info(
            f"suite {result.suite}: {result.row_count} rows, "
            + ("all expectations passed" if result.passed else f"failed: {', '.join(result.failed)}")
        )
        yield from suite_check_results(asset_key, checks, result, batch.metadata)

    return _suite_checks
