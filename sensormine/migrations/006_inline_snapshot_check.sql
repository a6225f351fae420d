-- sensormine_in_snapshot, same answer, as one expression: PostgreSQL inlines a single-expression
-- SQL function into the calling query, where the previous form (a subquery) ran as a function
-- call of ~8 us per row. The query planner evaluates it for every hot row of a compacted day.
CREATE OR REPLACE FUNCTION sensormine_in_snapshot(x xid, snap pg_snapshot) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN (x::text::bigint - (pg_snapshot_xmax(snap)::text::bigint & 4294967295) + 4294967296) % 4294967296
             < 2147483648 THEN false  -- at or after xmax: began after the snapshot
        ELSE pg_visible_in_snapshot(
            (pg_snapshot_xmax(snap)::text::bigint
             - (4294967296 - (x::text::bigint - (pg_snapshot_xmax(snap)::text::bigint & 4294967295) + 4294967296)
                % 4294967296))::text::xid8,
            snap)
    END
$$;
