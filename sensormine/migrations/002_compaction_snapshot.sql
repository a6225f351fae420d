-- The hot store's snapshot xmin when a tenant-day was compacted: rows written by transactions
-- at or after it may be missing from the lake, so the query planner reads them from the hot store too.
ALTER TABLE lake_compactions ADD COLUMN hot_snapshot_xmin bigint;
