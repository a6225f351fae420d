"""Sensor keeping the `tenants` dynamic partitions in step with the tenant registry."""

import json

import dagster as dg

from assets.telemetry import HotStore, tenant_partitions
from sensormine.tenancy.tenants import list_tenants


def parse_cursor(cursor: str | None) -> list[str]:
    """Tenant ids recorded in a sensor cursor (a JSON list; empty when there is none)."""
    if not cursor:
        return []
    seen = json.loads(cursor)
    if not isinstance(seen, list) or not all(isinstance(t, str) for t in seen):
        raise ValueError(f"tenant sensor cursor must be a JSON list of tenant ids, got {cursor!r}")
    return seen


@dg.sensor(
    name="tenant_partitions_sensor",
    required_resource_keys={"hot_store"},
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a `tenants` partition for every tenant in the registry; never removes one.",
)
def tenant_partitions_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Add the registry's tenants that are not yet `tenants` partitions; cursor = sorted ids seen."""
    # From the context, as in the assets: Dagster injects a parameter only when its type is a
    # resource class or dg.ResourceParam, so under the daemon a Protocol-typed one was never passed.
    hot_store: HotStore = context.resources.hot_store
    with hot_store.connect() as conn:
        registry = {t.id for t in list_tenants(conn)}
    # The instance, not the cursor, is the truth about which partitions exist: a partition
    # deleted by hand is re-added, and a lost cursor costs nothing.
    existing = set(context.instance.get_dynamic_partitions(tenant_partitions.name or ""))
    new = sorted(registry - existing)
    seen = sorted(registry | set(parse_cursor(context.cursor)))
    cursor = json.dumps(seen)
    if not new:
        return dg.SensorResult(skip_reason=f"all {len(registry)} tenants already have partitions", cursor=cursor)
    context.log.info(f"adding tenant partitions: {', '.join(new)}")
    return dg.SensorResult(dynamic_partitions_requests=[tenant_partitions.build_add_request(new)], cursor=cursor)
