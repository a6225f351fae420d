-- The hot store's snapshot when a tenant-day was compacted. Rows visible in it are in the lake;
-- any other row of that day (committed later, or by a transaction running then) may not be,
-- so the query planner reads exactly those from the hot store as well.
ALTER TABLE lake_compactions ADD COLUMN hot_snapshot pg_snapshot;

-- Whether a row's 32-bit xmin is visible in a (64-bit) snapshot. The xid is placed in the epoch
-- that makes it nearest to the snapshot's xmax, the usual circular xid comparison.
CREATE FUNCTION sensormine_in_snapshot(x xid, snap pg_snapshot) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN d < 2147483648 THEN false  -- at or after xmax: began after the snapshot
        ELSE pg_visible_in_snapshot((xmax8 - (4294967296 - d))::text::xid8, snap)
    END
    FROM (
        SELECT pg_snapshot_xmax(snap)::text::bigint AS xmax8,
               (x::text::bigint - (pg_snapshot_xmax(snap)::text::bigint & 4294967295) + 4294967296) % 4294967296 AS d
    ) s
$$;
