-- Tenancy, device registry, API keys, hot telemetry store, ingest bookkeeping.

DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_reader') THEN
        CREATE ROLE sensormine_reader NOLOGIN;
    END IF;
END $$;

CREATE TABLE tenants (
    id          text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    parent_id   text REFERENCES tenants(id),
    name        text NOT NULL,
    plan        text NOT NULL DEFAULT 'free',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (parent_id IS DISTINCT FROM id)
);

CREATE TABLE devices (
    tenant_id    text NOT NULL REFERENCES tenants(id),
    id           text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$'),
    name         text NOT NULL,
    device_type  text,
    key_hash     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants(id),
    name        text NOT NULL,
    key_hash    text NOT NULL,
    scopes      text[] NOT NULL DEFAULT '{read,write}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- The tenants a session may read: set per transaction by the API (tenant + its sub-tenants).
CREATE FUNCTION sensormine_visible_tenants() RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(string_to_array(nullif(current_setting('sensormine.tenant_ids', true), ''), ','), '{}')
$$;

-- Hot store: native range partitions by UTC day, created ahead of time by the writer.
-- The primary key is the dedupe identity and the query index at once.
CREATE TABLE telemetry (
    tenant_id  text NOT NULL,
    device_id  text NOT NULL,
    metric     text NOT NULL,
    ts         timestamptz NOT NULL,
    value      double precision NOT NULL,
    quality    smallint NOT NULL DEFAULT 0,
    ingest_ts  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id, metric, ts)
) PARTITION BY RANGE (ts);

ALTER TABLE telemetry ENABLE ROW LEVEL SECURITY;
CREATE POLICY telemetry_tenant_isolation ON telemetry
    USING (tenant_id = ANY (sensormine_visible_tenants()));

ALTER TABLE devices ENABLE ROW LEVEL SECURITY;
CREATE POLICY devices_tenant_isolation ON devices
    USING (tenant_id = ANY (sensormine_visible_tenants()));

GRANT SELECT ON telemetry, devices, tenants TO sensormine_reader;

-- Exactly-once from Kafka: the next offset per partition is committed in the same
-- transaction as the rows it covers.
CREATE TABLE ingest_offsets (
    consumer_group  text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer NOT NULL,
    next_offset     bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- Dead letters when no Kafka is configured (with Kafka they go to {env}.dlq).
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    source      text NOT NULL,
    origin      text,
    tenant_id   text,
    device_id   text,
    reason      text NOT NULL,
    payload     bytea NOT NULL
);

-- Which tenant-days the lake holds; the query planner reads the lake for these.
CREATE TABLE lake_compactions (
    tenant_id      text NOT NULL REFERENCES tenants(id),
    day            date NOT NULL,
    row_count      bigint NOT NULL,
    table_version  bigint NOT NULL,
    hot_watermark  timestamptz,
    compacted_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day)
);
GRANT SELECT ON lake_compactions TO sensormine_reader;
