-- Per tenant, device, metric and UTC day: how many readings, their spread, and their quality.
-- min/max/avg/stddev (sample) and first/last value are over finite values only; NaN and ±inf
-- readings are counted in `readings` and `non_finite_readings`. Rebuilt whole on every run
-- (see docs/dbt.md, "Full rebuilds").
select
    tenant_id,
    device_id,
    metric,
    reading_date,
    count(*) as readings,
    count(*) filter (where is_finite_value) as finite_readings,
    count(*) filter (where not is_finite_value) as non_finite_readings,
    min(value) filter (where is_finite_value) as min_value,
    max(value) filter (where is_finite_value) as max_value,
    avg(value) filter (where is_finite_value) as avg_value,
    stddev_samp(value) filter (where is_finite_value) as stddev_value,
    min(ts) as first_ts,
    max(ts) as last_ts,
    arg_min(value, ts) filter (where is_finite_value) as first_value,
    arg_max(value, ts) filter (where is_finite_value) as last_value,
    count(*) filter (where is_bad_quality) as bad_quality_readings,
    count(*) filter (where is_bad_quality) / count(*) as bad_quality_share
from {{ ref('stg_telemetry') }}
group by tenant_id, device_id, metric, reading_date
