-- Readings of the lake's telemetry table, typed and flagged for the marts.
-- `is_finite_value` separates real measurements from NaN/±inf (kept in the lake as sent):
-- the marts compute min/max/avg/stddev over finite values only and count the others.
select
    tenant_id,
    device_id,
    metric,
    ts,
    "date" as reading_date,
    value,
    cast(quality as smallint) as quality,
    ingest_ts,
    quality = {{ var('bad_quality') }} as is_bad_quality,
    isfinite(value) as is_finite_value
from {{ source('lake', 'telemetry') }}
