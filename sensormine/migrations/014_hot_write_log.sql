-- Late-write log (docs/query.md "Late rows"): every transaction that writes hot rows records, in the
-- same transaction, one row per (tenant, UTC day) it wrote, with its own top-level transaction id.
-- Compaction deletes the rows whose transaction is visible in its hot snapshot (the lake holds
-- their rows); what remains marks the tenant-days that may have rows the lake lacks, so readers
-- scan the hot rows of a compacted day only when that day has a remaining log row.
CREATE TABLE hot_write_log (
    tenant_id text NOT NULL,
    day       date NOT NULL,
    txid      xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (tenant_id, day, txid)
);

ALTER TABLE hot_write_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY hot_write_log_tenant_isolation ON hot_write_log
    USING (tenant_id = ANY (sensormine_visible_tenants()));
GRANT SELECT ON hot_write_log TO sensormine_reader, sensormine_writer;

-- Whether a row's 32-bit xmin is at or after a 64-bit transaction id (circular comparison within
-- 2^31 transactions). A transaction's rows carry its own xid or one of its subtransactions' xids,
-- which are assigned after it: so "xmin at or after the oldest late transaction" selects every row
-- of every late transaction (and some rows the lake holds, which readers drop by dedupe key).
-- One expression, so PostgreSQL inlines it and folds the constant part at plan time.
CREATE FUNCTION sensormine_xid_at_or_after(x xid, floor_txid xid8) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (x::text::bigint - (floor_txid::text::bigint & 4294967295) + 4294967296) % 4294967296 < 2147483648
$$;

-- Days compacted before this log existed may have late rows nobody logged: mark every compacted
-- tenant-day that still has a hot partition with this migration's transaction id, which no earlier
-- compaction snapshot can see. The next compaction of the day clears the mark.
INSERT INTO hot_write_log (tenant_id, day)
SELECT c.tenant_id, c.day
FROM lake_compactions c
WHERE c.day IN (
    SELECT to_date(substr(p.relname, 12), 'YYYYMMDD')
    FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
    WHERE i.inhparent = 'telemetry'::regclass AND p.relname ~ '^telemetry_p[0-9]{8}$'
)
ON CONFLICT DO NOTHING;
