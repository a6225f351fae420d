-- Metered usage (API calls flushed from Redis), quota events, and the quota-group helpers
-- (docs/quotas.md). Relies on 010: tenants.plan NULL means "inherits the parent's plan and quota".

-- Usage per tenant, metric and UTC day. Each tenant's own usage (sub-tenants separately, for
-- chargeback); a quota counts its whole quota group (sensormine_quota_group).
CREATE TABLE usage (
    tenant_id   text NOT NULL,
    metric      text NOT NULL,              -- 'api_calls', …
    day         date NOT NULL,
    value       bigint NOT NULL CHECK (value >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric, day)
);

-- The flush batches already added to `usage`: a batch re-flushed after a crash is recognised
-- here and not counted twice. Rows older than a few days are pruned by the flusher.
CREATE TABLE usage_flushes (
    flush_id    text PRIMARY KEY,
    rows        integer NOT NULL,
    total       bigint NOT NULL,
    flushed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_flushes_at ON usage_flushes (flushed_at);

-- Things that happened to a tenant that its admins should hear about (quota warnings, …).
-- `dedupe_key` makes recording an event idempotent (e.g. one warning per tenant, month and threshold).
CREATE TABLE tenant_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    tenant_id   text NOT NULL REFERENCES tenants(id),
    type        text NOT NULL,              -- e.g. quota.api_calls.warning
    data        jsonb NOT NULL DEFAULT '{}',
    dedupe_key  text UNIQUE
);
CREATE INDEX tenant_events_tenant_at ON tenant_events (tenant_id, id DESC);

ALTER TABLE usage ENABLE ROW LEVEL SECURITY;
CREATE POLICY usage_tenant_isolation ON usage
    USING (tenant_id = ANY (sensormine_visible_tenants()));
ALTER TABLE tenant_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_events_tenant_isolation ON tenant_events
    USING (tenant_id = ANY (sensormine_visible_tenants()));

GRANT SELECT ON usage, tenant_events TO sensormine_reader;
GRANT SELECT ON usage, tenant_events TO sensormine_writer;

-- The tenants whose usage counts against `qt`'s quota: qt and every descendant reached through
-- sub-tenants without a plan of their own (one with its own plan starts its own quota group).
CREATE FUNCTION sensormine_quota_group(qt text) RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    WITH RECURSIVE g AS (
        SELECT tenants.id FROM tenants WHERE tenants.id = qt
        UNION ALL
        SELECT c.id FROM tenants c JOIN g ON c.parent_id = g.id WHERE c.plan IS NULL
    )
    SELECT g.id FROM g
$$;

-- A tenant's device quota position, whatever the session may see: its quota tenant, the
-- effective plan, and the devices registered across the quota group. Security definer because a
-- sub-tenant's session cannot see its parent's devices, yet shares its parent's device quota.
CREATE FUNCTION sensormine_device_quota_usage(t text)
RETURNS TABLE (quota_tenant text, plan text, devices bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT q.qt, sensormine_effective_plan(t),
           (SELECT count(*) FROM devices d WHERE d.tenant_id IN (SELECT sensormine_quota_group(q.qt)))
    FROM (SELECT sensormine_quota_tenant(t) AS qt) q
$$;

-- Record an event once per dedupe key (whatever role the session runs as); true if it is new.
CREATE FUNCTION sensormine_record_tenant_event(t text, event_type text, payload jsonb, key text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO tenant_events (tenant_id, type, data, dedupe_key) VALUES (t, event_type, payload, key)
    ON CONFLICT (dedupe_key) DO NOTHING;
    RETURN FOUND;
END $$;

GRANT EXECUTE ON FUNCTION sensormine_quota_group(text), sensormine_device_quota_usage(text),
    sensormine_record_tenant_event(text, text, jsonb, text) TO sensormine_reader, sensormine_writer;
