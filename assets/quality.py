"""Data-quality asset checks on the lake's telemetry partitions (asset `["lake", "telemetry"]`).

All checks are partitioned like the asset, so they run in the same run as the compaction of a
tenant-day, are evaluated on exactly that partition, and are recorded against it in the UI.

* keys_not_null, rows_in_partition, values_in_schema_range, dedupe_key_unique (blocking): the
  Great Expectations suite of expectations/telemetry.py, run by one op;
* hot_lake_parity (blocking): lake rows = compaction record = hot rows in the compaction's
  snapshot; a pass records lake_compactions.verified_rows;
* freshness (WARN only): the tenant's last compaction and newest lake reading are recent.

A failing blocking check fails its step, so assets downstream of the telemetry asset in the same
run (rollups, ...) are not materialised for that partition.
"""

import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dagster as dg

from assets.telemetry import TELEMETRY_LAKE_KEY, HotStore, Lake, parse_partition_key, telemetry_partitions
from expectations.checks import SuiteCheck, build_suite_checks, rows_table
from expectations.suite import SuiteBatch
from expectations.telemetry import CHECK_DESCRIPTIONS, telemetry_batch
from lake.quality import DEFAULT_MAX_AGE, check_freshness, check_parity, parity_diff, partition_table
from sensormine.schemas.ranges import metric_ranges

PARITY_CHECK_NAME = "hot_lake_parity"
FRESHNESS_CHECK_NAME = "freshness"

TELEMETRY_SUITE_CHECKS = tuple(
    SuiteCheck(name, description, blocking=True) for name, description in CHECK_DESCRIPTIONS.items()
)
"""The Great Expectations suite's checks on each telemetry partition, all blocking."""

BLOCKING_CHECK_KEYS = tuple(
    dg.AssetCheckKey(TELEMETRY_LAKE_KEY, name) for name in (*CHECK_DESCRIPTIONS, PARITY_CHECK_NAME)
)
"""Keys of every blocking check on the telemetry asset."""


def load_telemetry_partition(context: dg.AssetCheckExecutionContext) -> SuiteBatch:
    """The run's telemetry partition from the lake, with the value ranges of the tenant's device schemas."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    with hot_store.connect() as conn:
        ranges = metric_ranges(conn, tenant_id)
    table = partition_table(lake.settings(), tenant_id, day)
    batch = telemetry_batch(table, tenant_id, day, ranges)
    return SuiteBatch(batch.suite, batch.frame, {**batch.metadata, "devices_with_schema": len(ranges)})


telemetry_suite_checks = build_suite_checks(
    TELEMETRY_LAKE_KEY,
    TELEMETRY_SUITE_CHECKS,
    load_telemetry_partition,
    name="telemetry_partition_suite",
    partitions_def=telemetry_partitions,
    required_resource_keys={"hot_store", "lake"},
    description="Great Expectations suite over the tenant-day partition just written to the lake.",
)


def _partitioned_check(
    fn: Callable[[dg.AssetCheckExecutionContext], dg.AssetCheckResult],
    *,
    name: str,
    blocking: bool,
    description: str,
    required_resource_keys: set[str],
) -> dg.AssetChecksDefinition:
    """`fn` as an asset check on the telemetry asset, partitioned like it."""
    with warnings.catch_warnings():
        # Partitioned asset checks are a preview feature of Dagster 1.13 (docs/quality.md).
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset_check(
            asset=TELEMETRY_LAKE_KEY,
            name=name,
            blocking=blocking,
            description=description,
            partitions_def=telemetry_partitions,
            required_resource_keys=required_resource_keys,
        )(fn)


def _parity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Hot-vs-lake row-count parity of the run's tenant-day; records verified_rows on success."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    settings = context.resources.lake.settings()
    with hot_store.connect() as conn:
        result = check_parity(conn, settings, tenant_id, day, record=True)
        sample = [] if result.passed or result.hot_rows is None else parity_diff(conn, settings, tenant_id, day)
    context.log.info(f"parity of {tenant_id} {day}: {result.reason}")
    metadata: dict[str, Any] = {
        "lake_rows": result.lake_rows,
        "recorded_rows": result.recorded_rows,
        "hot_rows_in_snapshot": result.hot_rows,
        "late_rows": result.late_rows,
        "table_version": result.table_version,
        "verified": result.verified_at is not None,
    }
    if result.verified_at is not None:
        metadata["verified_at"] = dg.MetadataValue.timestamp(result.verified_at)
    if sample:
        metadata["failing_rows"] = rows_table(sample)
        metadata["failing_rows_shown"] = len(sample)
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=result.reason,
        metadata={k: (dg.MetadataValue.null() if v is None else v) for k, v in metadata.items()},
    )


telemetry_parity_check = _partitioned_check(
    _parity,
    name=PARITY_CHECK_NAME,
    blocking=True,
    description="Rows in the lake partition = rows the compaction recorded = hot-store rows of the day visible "
    "in the compaction's snapshot (later rows are late data, not a mismatch). A pass records "
    "lake_compactions.verified_rows, which hot-store retention requires; failing_rows samples the differing keys.",
    required_resource_keys={"hot_store", "lake"},
)


def build_telemetry_freshness_check(max_age: timedelta = DEFAULT_MAX_AGE) -> dg.AssetChecksDefinition:
    """The freshness check (WARN, not blocking) with the given threshold."""

    def _freshness(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        tenant_id, _ = parse_partition_key(context.partition_key)
        hot_store: HotStore = context.resources.hot_store
        with hot_store.connect() as conn:
            result = check_freshness(conn, tenant_id, max_age)
        metadata: dict[str, Any] = {"max_age_minutes": max_age.total_seconds() / 60}
        if result.last_compacted_at is not None:
            metadata["last_compacted_at"] = dg.MetadataValue.timestamp(result.last_compacted_at)
        if result.newest_reading_at is not None:
            metadata["newest_reading_at"] = dg.MetadataValue.timestamp(result.newest_reading_at)
        if result.compaction_age is not None:
            metadata["compaction_age_minutes"] = round(result.compaction_age.total_seconds() / 60, 1)
        if result.reading_age is not None:
            metadata["reading_age_minutes"] = round(result.reading_age.total_seconds() / 60, 1)
        return dg.AssetCheckResult(
            passed=result.passed, severity=dg.AssetCheckSeverity.WARN, description=result.reason, metadata=metadata
        )

    return _partitioned_check(
        _freshness,
        name=FRESHNESS_CHECK_NAME,
        blocking=False,
        description=f"The tenant's last compaction, and the newest reading the lake holds for it (by ingest time), "
        f"are at most {max_age} old. Warns only.",
        required_resource_keys={"hot_store"},
    )


telemetry_freshness_check = build_telemetry_freshness_check()

telemetry_quality_checks: list[dg.AssetChecksDefinition] = [
    telemetry_suite_checks,
    telemetry_parity_check,
    telemetry_freshness_check,
]
"""Every check on the telemetry asset: pass to `Definitions(asset_checks=...)`."""
