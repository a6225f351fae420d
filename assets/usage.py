"""Usage assets: `usage_daily` (each tenant-day's metered usage, in PostgreSQL and the lake) and
`stripe_usage_report` (that usage sent to Stripe as meter events, each once). docs/billing.md."""

import warnings
from decimal import Decimal
from typing import Protocol

import dagster as dg
import stripe

from assets.telemetry import TELEMETRY_LAKE_KEY, HotStore, Lake, parse_partition_key, telemetry_partitions
from lake.storage import read_partition, table_uri
from lake.usage import TABLE_NAME, USAGE_SCHEMA, write_usage_day
from sensormine.billing.usage_report import report_usage_day
from sensormine.clients.postgres import METERING

USAGE_DAILY_KEY = dg.AssetKey(["billing", "usage_daily"])
STRIPE_USAGE_REPORT_KEY = dg.AssetKey(["billing", "stripe_usage_report"])


class Stripe(Protocol):
    """What the report needs from the `stripe` resource (orchestration.resources.StripeResource)."""

    def client(self) -> stripe.StripeClient: ...


@dg.asset(
    key=USAGE_DAILY_KEY,
    deps=[TELEMETRY_LAKE_KEY],
    partitions_def=telemetry_partitions,
    required_resource_keys={"hot_store", "lake"},
    group_name="billing",
    kinds={"deltalake", "postgres"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10),
    description="Metered usage of one tenant-day (API calls, ML inferences, active devices, readings, storage), "
    "replacing that day in PostgreSQL `usage_daily` and the Delta table {lake}/usage_daily.",
)
def usage_daily(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """One tenant-day's usage records."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    settings = lake.settings()
    with hot_store.connect(role=METERING) as metering, hot_store.connect() as lake_conn:
        result = write_usage_day(settings, metering, lake_conn, tenant_id, day)
    quantities = {r.resource_type: float(r.quantity) for r in result.records}
    context.log.info(f"usage of {tenant_id} {day}: {quantities}")
    return dg.MaterializeResult(
        metadata={
            **{r: dg.MetadataValue.float(q) for r, q in quantities.items()},
            "dagster/row_count": len(result.records),
            "storage_measured_now": result.snapshot_taken,
            "table_version": result.table_version,
            "uri": dg.MetadataValue.path(table_uri(settings, TABLE_NAME)),
        }
    )


def _matches_in_both_stores(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The Delta partition and the `usage_daily` rows of the tenant-day are equal, none negative."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    delta = read_partition(lake.settings(), TABLE_NAME, USAGE_SCHEMA, tenant_id, day, sort_by=["resource"])
    in_lake = {r["resource"]: r["quantity"] for r in delta.to_pylist()}
    with hot_store.connect(role=METERING) as conn:
        rows = conn.execute(
            "SELECT resource, quantity FROM usage_daily WHERE tenant_id = %s AND day = %s", (tenant_id, day)
        ).fetchall()
    in_pg: dict[str, Decimal] = {str(r): q for r, q in rows}
    negative = sorted(r for r, q in in_pg.items() if q < 0)
    return dg.AssetCheckResult(
        passed=in_lake == in_pg and not negative,
        metadata={"resources": len(in_pg), "negative": ", ".join(negative), "differ": str(in_lake != in_pg)},
    )


with warnings.catch_warnings():
    # Partitioned asset checks are a preview feature of Dagster 1.13 (docs/quality.md).
    warnings.simplefilter("ignore", dg.PreviewWarning)
    usage_daily_matches_in_both_stores = dg.asset_check(
        asset=USAGE_DAILY_KEY,
        name="matches_in_both_stores",
        blocking=True,
        partitions_def=telemetry_partitions,
        required_resource_keys={"hot_store", "lake"},
        description="The lake's partition and PostgreSQL's rows hold the same usage, none of it negative.",
    )(_matches_in_both_stores)


@dg.asset(
    key=STRIPE_USAGE_REPORT_KEY,
    deps=[USAGE_DAILY_KEY],
    partitions_def=telemetry_partitions,
    required_resource_keys={"hot_store", "stripe"},
    group_name="billing",
    kinds={"stripe", "postgres"},
    retry_policy=dg.RetryPolicy(max_retries=3, delay=30),
    description="One closed tenant-day's metered usage sent to Stripe as billing meter events (identifier "
    "sensormine:<tenant>:<resource>:<day>), each recorded in stripe_meter_events once acknowledged: a re-run "
    "or backfill sends only what is missing.",
)
def stripe_usage_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Meter events of one tenant-day."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    billing: Stripe = context.resources.stripe
    with hot_store.connect(role=METERING) as conn:
        report = report_usage_day(conn, billing.client(), tenant_id, day)
    if report.skipped:
        context.log.info(f"usage of {tenant_id} {day} not reported: {report.skipped}")
    else:
        context.log.info(f"usage of {tenant_id} {day}: {len(report.sent)} meter events sent, {len(report.kept)} kept")
    return dg.MaterializeResult(
        metadata={
            "sent": len(report.sent),
            "already_sent": len(report.kept),
            "skipped": report.skipped or "",
            "identifiers": ", ".join(report.sent),
        }
    )
