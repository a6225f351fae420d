"""Usage assets: `usage_daily` (each tenant-day's metered usage, in PostgreSQL and the lake) and
`stripe_usage_report` (that usage sent to Stripe as meter events, each once). docs/billing.md."""

import warnings
from datetime import date
from decimal import Decimal
from typing import Protocol

import dagster as dg
import stripe

from assets.telemetry import (
    DATE_DIMENSION,
    TELEMETRY_LAKE_KEY,
    TENANT_DIMENSION,
    HotStore,
    Lake,
    parse_partition_key,
    telemetry_partitions,
    tenant_partitions,
)
from lake.storage import read_partition, table_uri
from lake.usage import TABLE_NAME, USAGE_SCHEMA, write_usage_day, write_usage_month
from sensormine.billing.invoice_preview import preview_month, record_preview
from sensormine.billing.usage_report import report_usage_day
from sensormine.clients.postgres import METERING
from sensormine.metering.records import ADDITIVE

USAGE_DAILY_KEY = dg.AssetKey(["billing", "usage_daily"])
STRIPE_USAGE_REPORT_KEY = dg.AssetKey(["billing", "stripe_usage_report"])
USAGE_MONTHLY_KEY = dg.AssetKey(["billing", "usage_monthly"])
INVOICE_PREVIEW_KEY = dg.AssetKey(["billing", "invoice_preview"])
MONTH_DIMENSION = "month"

# end_offset=1 makes the month in progress a partition (its preview so far).
monthly_partitions = dg.MonthlyPartitionsDefinition(start_date="2026-01-01", end_offset=1)
usage_month_partitions = dg.MultiPartitionsDefinition(
    {MONTH_DIMENSION: monthly_partitions, TENANT_DIMENSION: tenant_partitions}
)
# A tenant-month depends on the same tenant's days of that month.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)  # MultiPartitionMapping is beta in Dagster 1.13
    DAYS_OF_THE_MONTH = dg.MultiPartitionMapping(
        {
            DATE_DIMENSION: dg.DimensionPartitionMapping(MONTH_DIMENSION, dg.TimeWindowPartitionMapping()),
            TENANT_DIMENSION: dg.DimensionPartitionMapping(TENANT_DIMENSION, dg.IdentityPartitionMapping()),
        }
    )


def month_partition_key(tenant_id: str, month: date) -> dg.MultiPartitionKey:
    """The usage-month partition key of one tenant-month (`month` is its first day)."""
    return dg.MultiPartitionKey({MONTH_DIMENSION: month.isoformat(), TENANT_DIMENSION: tenant_id})


def parse_month_key(key: str | dg.MultiPartitionKey) -> tuple[str, date]:
    """(tenant_id, first day of the month) of a usage-month partition key ("YYYY-MM-DD|tenant" string form)."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims[TENANT_DIMENSION], date.fromisoformat(dims[MONTH_DIMENSION])
    month, _, tenant_id = key.partition("|")
    return tenant_id, date.fromisoformat(month)


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
            "quota_events": ", ".join(result.quota_events),
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
            "canceled": ", ".join(report.canceled),
            "overreported": "; ".join(report.overreported),
            "skipped": report.skipped or "",
            "identifiers": ", ".join(report.sent),
        }
    )


@dg.asset(
    key=USAGE_MONTHLY_KEY,
    deps=[dg.AssetDep(USAGE_DAILY_KEY, partition_mapping=DAYS_OF_THE_MONTH)],
    partitions_def=usage_month_partitions,
    required_resource_keys={"hot_store", "lake"},
    group_name="billing",
    kinds={"postgres"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10),
    description="One tenant-month's usage: sums of the daily API calls, ML inferences and readings, devices "
    "active on any day (distinct), storage as the mean of the daily snapshots in GB-month; replaces the "
    "month in PostgreSQL `usage_monthly`.",
)
def usage_monthly(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """One tenant-month of usage."""
    tenant_id, month = parse_month_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    with hot_store.connect(role=METERING) as metering:
        records = write_usage_month(lake.settings(), metering, tenant_id, month)
    return dg.MaterializeResult(
        metadata={r.resource_type: dg.MetadataValue.float(float(r.quantity)) for r in records}
        | {"dagster/row_count": len(records)}
    )


def _monthly_equals_daily(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """The month's additive rows equal the sums of its daily rows; a tenant with daily usage has monthly rows."""
    tenant_id, month = parse_month_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    with hot_store.connect(role=METERING) as conn:
        rows = conn.execute(
            "SELECT r, d.total, m.quantity FROM unnest(%s::text[]) r "
            "LEFT JOIN (SELECT resource, sum(quantity) AS total FROM usage_daily WHERE tenant_id = %s "
            "AND date_trunc('month', day) = %s GROUP BY resource) d ON d.resource = r "
            "LEFT JOIN usage_monthly m ON m.tenant_id = %s AND m.month = %s AND m.resource = r",
            (list(ADDITIVE), tenant_id, month, tenant_id, month),
        ).fetchall()
    differ = [
        f"{r}: daily {d} monthly {m}" for r, d, m in rows if (d or 0) != (m or 0) or (d is not None and m is None)
    ]
    return dg.AssetCheckResult(passed=not differ, metadata={"differ": "; ".join(differ), "resources": len(rows)})


@dg.asset(
    key=INVOICE_PREVIEW_KEY,
    deps=[USAGE_MONTHLY_KEY],
    partitions_def=usage_month_partitions,
    required_resource_keys={"hot_store"},
    group_name="billing",
    kinds={"postgres"},
    description="One tenant-month's invoice preview: the plan's price and the overage of each resource beyond "
    "its allowance (Decimal USD, lines rounded to the cent, the total their sum); PostgreSQL `invoice_previews`.",
)
def invoice_preview(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """One tenant-month's preview."""
    tenant_id, month = parse_month_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    with hot_store.connect(role=METERING) as conn, conn.transaction():
        preview = preview_month(conn, tenant_id, month)
        record_preview(conn, preview)
    return dg.MaterializeResult(
        metadata={
            "plan": preview.plan,
            "total": str(preview.total) if preview.total is not None else "priced per contract",
            "currency": preview.currency,
            "lines": len(preview.lines),
        }
    )


with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)
    usage_monthly_equals_daily_sums = dg.asset_check(
        asset=USAGE_MONTHLY_KEY,
        name="equals_daily_sums",
        blocking=True,
        partitions_def=usage_month_partitions,
        required_resource_keys={"hot_store"},
        description="The month's API calls, ML inferences and readings equal the sums of its days; a tenant with "
        "daily usage has its monthly rows.",
    )(_monthly_equals_daily)
