{#
  tenant_usage must account for every reading of the lake exactly once: per tenant and day its
  counts equal those computed straight from the readings, and no tenant-day is missing or extra.
#}
{{ config(meta={"dagster": {"ref": {"name": "tenant_usage"}}}) }}

with from_readings as (
    select
        tenant_id,
        reading_date,
        count(*) as readings,
        count(distinct device_id) as devices,
        count(distinct metric) as metrics,
        count(*) filter (where is_bad_quality) as bad_quality_readings
    from {{ ref('stg_telemetry') }}
    group by tenant_id, reading_date
)

select
    coalesce(r.tenant_id, u.tenant_id) as tenant_id,
    coalesce(r.reading_date, u.reading_date) as reading_date,
    r.readings as expected_readings,
    u.readings as actual_readings
from from_readings as r
full outer join {{ ref('tenant_usage') }} as u
    on r.tenant_id = u.tenant_id and r.reading_date = u.reading_date
where r.tenant_id is null
    or u.tenant_id is null
    or r.readings <> u.readings
    or r.devices <> u.devices
    or r.metrics <> u.metrics
    or r.bad_quality_readings <> u.bad_quality_readings
