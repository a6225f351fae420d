-- Device schemas (versioned JSON Schemas of a device type's payload) and the lake's verified
-- row counts.

-- One row per version of a tenant's device type schema; versions count up from 1 and are
-- never rewritten. `definition` is a JSON Schema of the payload
-- {"ts": ..., "values": {"<metric>": number}}; a device uses the latest version of its type.
CREATE TABLE device_schemas (
    tenant_id    text NOT NULL REFERENCES tenants(id),
    device_type  text NOT NULL CHECK (device_type <> ''),
    version      integer NOT NULL CHECK (version > 0),
    definition   jsonb NOT NULL CHECK (jsonb_typeof(definition) = 'object'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_type, version)
);

ALTER TABLE device_schemas ENABLE ROW LEVEL SECURITY;
CREATE POLICY device_schemas_tenant_isolation ON device_schemas
    USING (tenant_id = ANY (sensormine_visible_tenants()));
GRANT SELECT ON device_schemas TO sensormine_reader;

-- A passing hot-vs-lake parity check of a compacted tenant-day records how many rows it
-- verified and when. Hot-store retention drops a day only where verified_rows = row_count.
ALTER TABLE lake_compactions ADD COLUMN verified_rows bigint, ADD COLUMN verified_at timestamptz;

-- A new compaction of a tenant-day replaces what was verified: unless the same UPDATE sets a
-- verification itself, rewriting the row (new table version or compaction time) clears it, so
-- a stale verification can never vouch for a partition that was rewritten since.
CREATE FUNCTION sensormine_compaction_unverify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.table_version, NEW.compacted_at) IS DISTINCT FROM (OLD.table_version, OLD.compacted_at)
       AND (NEW.verified_rows, NEW.verified_at) IS NOT DISTINCT FROM (OLD.verified_rows, OLD.verified_at) THEN
        NEW.verified_rows := NULL;
        NEW.verified_at := NULL;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER lake_compactions_unverify BEFORE UPDATE ON lake_compactions
    FOR EACH ROW EXECUTE FUNCTION sensormine_compaction_unverify();
