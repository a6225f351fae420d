"""The one Dagster entry point: `dagster dev -m orchestration.definitions`.

Each domain's assets and sensors are gathered here; this is also the one place where the
environment (SENSORMINE_* variables) is mapped onto resources.
"""

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.anomaly import anomaly_models, anomaly_scores, anomaly_scores_complete
from assets.dbt import sensormine_dbt_models
from assets.quality import telemetry_quality_checks
from assets.rollups import telemetry_1h, telemetry_1m
from assets.telemetry import telemetry_lake, telemetry_partition_key, telemetry_partitions, tenant_partitions
from assets.usage import (
    invoice_preview,
    month_partition_key,
    stripe_usage_report,
    usage_daily,
    usage_daily_matches_in_both_stores,
    usage_month_partitions,
    usage_monthly,
    usage_monthly_equals_daily_sums,
)
from orchestration.dbt_resources import build_dbt_resource, dbt_models_daily_schedule, dbt_models_job
from orchestration.housekeeping import lake_housekeeping_job, lake_housekeeping_schedule
from orchestration.resources import HotStoreResource, LakeResource, StripeResource
from sensormine.settings import get_settings
from sensors.hot_data import hot_data_sensor
from sensors.quality import failed_quality_checks_sensor
from sensors.tenants import tenant_partitions_sensor


def _env(name: str) -> dg.EnvVar | None:
    """A deferred reference to an optional SENSORMINE_* variable, or None (the resource's default) when unset."""
    # EnvVar is resolved when a run starts, so secrets never land in the instance's storage;
    # an unset EnvVar is an error in Dagster, hence None for the optional ones.
    return dg.EnvVar(name) if os.environ.get(name) else None


def build_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources for the current environment, from SENSORMINE_* variables."""
    return {
        "hot_store": HotStoreResource(database_url=dg.EnvVar("SENSORMINE_DATABASE_URL")),
        "lake": LakeResource(
            lake_uri=_env("SENSORMINE_LAKE_URI"),
            state_dir=_env("SENSORMINE_STATE_DIR"),
            s3_endpoint=_env("SENSORMINE_S3_ENDPOINT"),
            s3_access_key=_env("SENSORMINE_S3_ACCESS_KEY"),
            s3_secret_key=_env("SENSORMINE_S3_SECRET_KEY"),
            s3_region=_env("SENSORMINE_S3_REGION") or "us-east-1",
        ),
        "dbt": build_dbt_resource(),
        "stripe": StripeResource(
            api_key=_env("SENSORMINE_STRIPE_API_KEY"), api_base=_env("SENSORMINE_STRIPE_API_BASE")
        ),
    }


TELEMETRY_ASSETS = [telemetry_lake, telemetry_1m, telemetry_1h]

telemetry_lake_job = dg.define_asset_job(
    "telemetry_lake_job",
    selection=dg.AssetSelection.assets(*TELEMETRY_ASSETS),
    partitions_def=telemetry_partitions,
    description="Compact tenant-days of the hot store into the lake, then roll them up (1 min, 1 h).",
)


def _per_tenant(
    context: dg.ScheduleEvaluationContext, key_of: Callable[[str, datetime], dg.MultiPartitionKey]
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """One run per tenant partition, for the partition `key_of(tenant, tick)` names."""
    tick = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    tenants = sorted(context.instance.get_dynamic_partitions(tenant_partitions.name or ""))
    if not tenants:
        yield dg.SkipReason("no tenant partitions yet (tenant_partitions_sensor adds them)")
        return
    for tenant_id in tenants:
        key = key_of(tenant_id, tick)
        # run_key dedupes within one tick only, so the same key is fine again at the next tick.
        yield dg.RunRequest(run_key=str(key), partition_key=key)


def _tenant_day_requests(
    context: dg.ScheduleEvaluationContext, day_of_tick: timedelta
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """One run per tenant for the UTC day at `day_of_tick` from the tick."""
    yield from _per_tenant(context, lambda tenant, tick: telemetry_partition_key(tenant, (tick + day_of_tick).date()))


@dg.schedule(
    name="telemetry_lake_hourly_schedule",
    job=telemetry_lake_job,
    cron_schedule=get_settings().lake_compaction_cron,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Compact and roll up today's partition of every tenant, on SENSORMINE_LAKE_COMPACTION_CRON "
    "(hourly at :05 by default).",
)
def telemetry_lake_hourly_schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """Today's partition of every tenant."""
    yield from _tenant_day_requests(context, timedelta(0))


@dg.schedule(
    name="telemetry_lake_daily_close_schedule",
    job=telemetry_lake_job,
    cron_schedule="30 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="At 00:30 UTC, close yesterday: compact, check and roll up its final contents for every tenant.",
)
def telemetry_lake_daily_close_schedule(
    context: dg.ScheduleEvaluationContext,
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """Yesterday's partition of every tenant (its last hour arrived after the last hourly run)."""
    yield from _tenant_day_requests(context, timedelta(days=-1))


ANOMALY_SCORE_ASSETS = [anomaly_scores]

anomaly_scores_job = dg.define_asset_job(
    "anomaly_scores_job",
    selection=dg.AssetSelection.assets(*ANOMALY_SCORE_ASSETS),
    partitions_def=telemetry_partitions,
    description="Score tenant-days of the lake with the newest anomaly model of each device type.",
)

anomaly_models_job = dg.define_asset_job(
    "anomaly_models_job",
    selection=dg.AssetSelection.assets(anomaly_models),
    description="Train and register one anomaly model version per device type from the lake's recent history.",
)


@dg.schedule(
    name="anomaly_scores_daily_schedule",
    job=anomaly_scores_job,
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="At 01:00 UTC, after the daily close, score yesterday's lake partition of every tenant.",
)
def anomaly_scores_daily_schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """Yesterday's partition of every tenant, closed at 00:30."""
    yield from _tenant_day_requests(context, timedelta(days=-1))


@dg.schedule(
    name="anomaly_models_weekly_schedule",
    job=anomaly_models_job,
    cron_schedule="0 2 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="On Sundays at 02:00 UTC, retrain each device type's anomaly model on the last 7 days of "
    "the lake (a type with too little history keeps its current version).",
)
def anomaly_models_weekly_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """One training run a week, keyed by its day."""
    tick = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    return dg.RunRequest(run_key=f"anomaly-models-{tick.date().isoformat()}")


USAGE_ASSETS = [usage_daily, stripe_usage_report]

usage_job = dg.define_asset_job(
    "usage_job",
    selection=dg.AssetSelection.assets(*USAGE_ASSETS),
    partitions_def=telemetry_partitions,
    description="Roll up tenant-days of metered usage (PostgreSQL + lake) and report them to Stripe.",
)


@dg.schedule(
    name="usage_daily_schedule",
    job=usage_job,
    cron_schedule="30 1 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="At 01:30 UTC, after the daily close, roll up yesterday's usage of every tenant, measure its "
    "storage and report it to Stripe.",
)
def usage_daily_schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """Yesterday's partition of every tenant, closed at 00:30."""
    yield from _tenant_day_requests(context, timedelta(days=-1))


MONTH_ASSETS = [usage_monthly, invoice_preview]

billing_month_job = dg.define_asset_job(
    "billing_month_job",
    selection=dg.AssetSelection.assets(*MONTH_ASSETS),
    partitions_def=usage_month_partitions,
    description="Roll up tenant-months of usage and price them (invoice previews).",
)


def _tenant_month_requests(
    context: dg.ScheduleEvaluationContext, previous: bool
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """One billing_month_job run per tenant for the month in progress at the tick, or the month before it."""

    def month_of(tenant_id: str, tick: datetime) -> dg.MultiPartitionKey:
        first = tick.date().replace(day=1)
        return month_partition_key(tenant_id, (first - timedelta(days=1)).replace(day=1) if previous else first)

    yield from _per_tenant(context, month_of)


@dg.schedule(
    name="billing_month_to_date_schedule",
    job=billing_month_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 02:00 UTC (after the usage rollup), the month in progress of every tenant: its usage "
    "so far and invoice preview.",
)
def billing_month_to_date_schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """The month in progress of every tenant."""
    yield from _tenant_month_requests(context, previous=False)


@dg.schedule(
    name="billing_month_close_schedule",
    job=billing_month_job,
    cron_schedule="30 2 1 * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="On the 1st at 02:30 UTC, close the month before for every tenant: final usage and preview.",
)
def billing_month_close_schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """The previous month of every tenant."""
    yield from _tenant_month_requests(context, previous=True)


defs = dg.Definitions(
    assets=[*TELEMETRY_ASSETS, sensormine_dbt_models, anomaly_models, anomaly_scores, *USAGE_ASSETS, *MONTH_ASSETS],
    asset_checks=[
        *telemetry_quality_checks,
        anomaly_scores_complete,
        usage_daily_matches_in_both_stores,
        usage_monthly_equals_daily_sums,
    ],
    jobs=[
        telemetry_lake_job,
        lake_housekeeping_job,
        dbt_models_job,
        anomaly_scores_job,
        anomaly_models_job,
        usage_job,
        billing_month_job,
    ],
    schedules=[
        telemetry_lake_hourly_schedule,
        telemetry_lake_daily_close_schedule,
        lake_housekeeping_schedule,
        dbt_models_daily_schedule,
        anomaly_scores_daily_schedule,
        anomaly_models_weekly_schedule,
        usage_daily_schedule,
        billing_month_to_date_schedule,
        billing_month_close_schedule,
    ],
    sensors=[tenant_partitions_sensor, hot_data_sensor, failed_quality_checks_sensor],
    resources=build_resources(),
    # Every step of a run in the run's own process: the steps are short I/O (milliseconds to
    # seconds), while a process per step (the multiprocess default) costs seconds of start-up
    # each. Runs still run side by side (max_concurrent_runs in dagster.yaml). docs/decisions.md.
    executor=dg.in_process_executor,
)
