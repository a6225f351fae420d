"""Sensor requesting compactions when a hot-store day has grown by more than a threshold since it last asked.

It watches PostgreSQL's own per-partition insert counters (`pg_stat_user_tables.n_tup_ins`),
which cost nothing to read, instead of scanning telemetry (they count attempted inserts, so a
batch retried after a duplicate counts twice: a trigger, not a measure); only when a day crossed the threshold
does it look up (with an index-only loose scan) which tenants have rows in that day.
"""

import json
from datetime import date

import dagster as dg
import psycopg
from psycopg import sql

from assets.telemetry import HotStore, telemetry_partition_key, tenant_partitions
from sensormine.clients.postgres import existing_partition_days, partition_name
from sensormine.settings import get_settings


def insert_counters(conn: psycopg.Connection) -> dict[date, int]:
    """Rows ever inserted into each hot-store day partition (PostgreSQL's cumulative statistics)."""
    names = {partition_name(d): d for d in existing_partition_days(conn)}
    rows = conn.execute(
        "SELECT relname, n_tup_ins FROM pg_stat_user_tables WHERE relname = ANY(%s)", (list(names),)
    ).fetchall()
    return {names[name]: int(n) for name, n in rows}


def tenants_in_day(conn: psycopg.Connection, day: date) -> list[str]:
    """Tenants with rows in one day partition: a loose index scan over the primary key's first column."""
    query = sql.SQL(
        "WITH RECURSIVE t AS ("
        " (SELECT tenant_id FROM {p} ORDER BY tenant_id LIMIT 1)"
        " UNION ALL"
        " SELECT (SELECT tenant_id FROM {p} WHERE tenant_id > t.tenant_id ORDER BY tenant_id LIMIT 1)"
        " FROM t WHERE t.tenant_id IS NOT NULL"
        ") SELECT tenant_id FROM t WHERE tenant_id IS NOT NULL"
    ).format(p=sql.Identifier(partition_name(day)))
    return [t for (t,) in conn.execute(query).fetchall()]


@dg.sensor(
    name="hot_data_sensor",
    job_name="telemetry_lake_job",
    required_resource_keys={"hot_store"},
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Compacts a day early when the hot store gained more than SENSORMINE_HOT_DATA_THRESHOLD_ROWS "
    "rows (default 1 000 000) in it since the last request, instead of waiting for the hourly schedule.",
)
def hot_data_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Cursor: JSON {day: n_tup_ins at the last request}; a day's first sighting only sets its baseline."""
    # From the context, as in the assets: Dagster injects a parameter only when its type is a
    # resource class or dg.ResourceParam, so under the daemon a Protocol-typed one was never passed.
    hot_store: HotStore = context.resources.hot_store
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    limit = get_settings().hot_data_threshold_rows
    known = set(context.instance.get_dynamic_partitions(tenant_partitions.name or ""))
    requests = []
    with hot_store.connect() as conn:
        counters = insert_counters(conn)
        for day, inserted in sorted(counters.items()):
            key = day.isoformat()
            if key not in seen or inserted < seen[key]:  # new day, or statistics were reset
                seen[key] = inserted
                continue
            if inserted - seen[key] < limit:
                continue
            tenants = [t for t in tenants_in_day(conn, day) if t in known]
            context.log.info(f"{day}: {inserted - seen[key]} new rows; compacting {', '.join(tenants) or 'nothing'}")
            for tenant_id in tenants:
                pk = telemetry_partition_key(tenant_id, day)
                requests.append(dg.RunRequest(run_key=f"{pk}@{inserted}", partition_key=pk))
            seen[key] = inserted
    cursor = json.dumps({k: v for k, v in seen.items() if date.fromisoformat(k) in counters})
    if not requests:
        return dg.SensorResult(skip_reason=f"no day gained {limit} rows", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
