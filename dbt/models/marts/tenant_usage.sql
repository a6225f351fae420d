-- Per tenant and UTC day: volume of readings, distinct devices, metrics and series
-- (device × metric), and bad-quality readings. Built from device_daily_stats, which already
-- holds one row per series and day, so the lake is scanned once per run.
select
    tenant_id,
    reading_date,
    sum(readings)::bigint as readings,
    count(distinct device_id) as devices,
    count(distinct metric) as metrics,
    count(*) as series,
    sum(bad_quality_readings)::bigint as bad_quality_readings,
    sum(bad_quality_readings) / sum(readings) as bad_quality_share
from {{ ref('device_daily_stats') }}
group by tenant_id, reading_date
