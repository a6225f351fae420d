"""Rollup assets: `lake/telemetry_1m` from the lake's telemetry, `lake/telemetry_1h` from `telemetry_1m`."""

import dagster as dg

from assets.telemetry import TELEMETRY_LAKE_KEY, Lake, parse_partition_key, telemetry_partitions
from lake.rollups import ROLLUP_1H, ROLLUP_1M, Rollup, write_rollup
from lake.storage import table_uri

TELEMETRY_1M_KEY = dg.AssetKey(["lake", ROLLUP_1M.name])
TELEMETRY_1H_KEY = dg.AssetKey(["lake", ROLLUP_1H.name])


def _materialize(context: dg.AssetExecutionContext, rollup: Rollup) -> dg.MaterializeResult:
    tenant_id, day = parse_partition_key(context.partition_key)
    lake: Lake = context.resources.lake
    settings = lake.settings()
    result = write_rollup(settings, rollup, tenant_id, day)
    context.log.info(
        f"{rollup.name}: {result.rows} buckets over {result.readings} readings of {tenant_id} {day}, "
        f"table version {result.table_version}"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "readings": result.readings,
            "table_version": result.table_version,
            "uri": dg.MetadataValue.path(table_uri(settings, rollup.name)),
        }
    )


def rollup_asset(rollup: Rollup, key: dg.AssetKey, source: dg.AssetKey, description: str) -> dg.AssetsDefinition:
    """The partitioned asset that writes `rollup` for one tenant-day from its `source` asset."""

    @dg.asset(
        key=key,
        deps=[source],
        partitions_def=telemetry_partitions,
        required_resource_keys={"lake"},
        group_name="telemetry",
        kinds={"deltalake", "polars"},
        retry_policy=dg.RetryPolicy(max_retries=2, delay=10),
        description=description,
    )
    def _rollup(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return _materialize(context, rollup)

    return _rollup


telemetry_1m = rollup_asset(
    ROLLUP_1M,
    TELEMETRY_1M_KEY,
    TELEMETRY_LAKE_KEY,
    "Per device x metric one-minute buckets (count, min, max, sum, avg, first, last) of one tenant-day, "
    "computed from the lake's telemetry; Delta table {lake}/telemetry_1m.",
)
telemetry_1h = rollup_asset(
    ROLLUP_1H,
    TELEMETRY_1H_KEY,
    TELEMETRY_1M_KEY,
    "Per device x metric one-hour buckets of one tenant-day, combined exactly from telemetry_1m; "
    "Delta table {lake}/telemetry_1h.",
)
