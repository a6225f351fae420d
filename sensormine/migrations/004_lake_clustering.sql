-- When housekeeping last clustered (z-ordered by device_id) a compacted tenant-day; NULL until
-- then, and again after every new compaction of that day (compact_day resets it).
ALTER TABLE lake_compactions ADD COLUMN clustered_at timestamptz;
