-- What the ingest paths saw of each device: last message, counters. Updated additively by every
-- daemon (and HTTP ingest) from in-memory tallies flushed every few seconds.
CREATE TABLE device_status (
    tenant_id     text NOT NULL,
    device_id     text NOT NULL,
    last_seen     timestamptz NOT NULL,
    last_source   text NOT NULL,
    messages      bigint NOT NULL DEFAULT 0,
    readings      bigint NOT NULL DEFAULT 0,
    errors        bigint NOT NULL DEFAULT 0,
    last_error    text,
    last_error_at timestamptz,
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, id) ON DELETE CASCADE
);

ALTER TABLE device_status ENABLE ROW LEVEL SECURITY;
CREATE POLICY device_status_tenant_isolation ON device_status
    USING (tenant_id = ANY (sensormine_visible_tenants()));
GRANT SELECT ON device_status TO sensormine_reader;
