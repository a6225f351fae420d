"""The one Dagster entry point: `dagster dev -m orchestration.definitions`.

Each domain's assets and sensors are gathered here; this is also the one place where the
environment (SENSORMINE_* variables) is mapped onto resources.
"""

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.telemetry import telemetry_lake, telemetry_partition_key, telemetry_partitions, tenant_partitions
from orchestration.resources import HotStoreResource, LakeResource
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
    }


telemetry_lake_job = dg.define_asset_job(
    "telemetry_lake_job",
    selection=[telemetry_lake],
    partitions_def=telemetry_partitions,
    description="Compact tenant-days of the hot store into the lake's telemetry table.",
)


@dg.schedule(
    name="telemetry_lake_hourly_schedule",
    job=telemetry_lake_job,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every hour, compact today's partition of every tenant (and yesterday's, at midnight).",
)
def telemetry_lake_hourly_schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """One run per tenant for the UTC day of the tick."""
    tick = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    days = [tick.date()]
    if tick.hour == 0:
        # Yesterday's last hour arrived after its previous compaction; close the day off.
        days.insert(0, tick.date() - timedelta(days=1))
    tenants = sorted(context.instance.get_dynamic_partitions(tenant_partitions.name or ""))
    if not tenants:
        yield dg.SkipReason("no tenant partitions yet (tenant_partitions_sensor adds them)")
        return
    for day in days:
        for tenant_id in tenants:
            key = telemetry_partition_key(tenant_id, day)
            # run_key dedupes within one tick only, so the same key is fine again next hour.
            yield dg.RunRequest(run_key=str(key), partition_key=key)


defs = dg.Definitions(
    assets=[telemetry_lake],
    jobs=[telemetry_lake_job],
    schedules=[telemetry_lake_hourly_schedule],
    sensors=[tenant_partitions_sensor],
    resources=build_resources(),
)
