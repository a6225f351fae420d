-- Usage events (docs/billing.md, "Usage events"): one row per event, by its id, so a replayed event
-- (a redelivered Kafka message, a retried flush) is stored and counted once. Each new event is also
-- added to the `usage` ledger (metric = resource, UTC day of its timestamp), which the quotas and the
-- daily rollup read; the raw rows stay for audits and independent recomputation.
CREATE TABLE usage_events (
    event_id    text PRIMARY KEY,
    tenant_id   text NOT NULL,
    ts          timestamptz NOT NULL,
    resource    text NOT NULL,
    quantity    bigint NOT NULL CHECK (quantity >= 0),
    unit        text NOT NULL,
    source      text NOT NULL,              -- ingest:consumer, ingest:in-process, api, …
    metadata    jsonb NOT NULL DEFAULT '{}',
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_tenant_ts ON usage_events (tenant_id, ts);
CALL sensormine_billing_table('usage_events');

-- Storing events is all the producers' roles may do here: the ingest role (the hot-store writer
-- meters accepted payload bytes in the rows' own transaction) and the metering role (the metering
-- consumer of {env}.metering.events, the API's egress meter) call this function, the owner's, which
-- adds new events and their ledger counts and nothing else. Only the resources events carry.
CREATE POLICY usage_events_definer ON usage_events FOR ALL TO sensormine_owner USING (true) WITH CHECK (true);
CREATE POLICY usage_events_ledger_definer ON usage FOR ALL TO sensormine_owner
    USING (metric IN ('data_ingested', 'data_egress')) WITH CHECK (metric IN ('data_ingested', 'data_egress'));

CREATE FUNCTION sensormine_store_usage_events(
    p_ids text[], p_tenants text[], p_ts timestamptz[], p_resources text[], p_quantities bigint[],
    p_units text[], p_sources text[], p_metadata jsonb[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    n integer;
BEGIN
    IF cardinality(p_ids) IS DISTINCT FROM cardinality(p_tenants)
        OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_ts)
        OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_resources)
        OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_quantities)
        OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_units)
        OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_sources)
        OR cardinality(p_ids) IS DISTINCT FROM cardinality(p_metadata) THEN
        RAISE EXCEPTION 'usage event arrays differ in length';
    END IF;
    IF EXISTS (SELECT FROM unnest(p_resources) AS r WHERE r NOT IN ('data_ingested', 'data_egress')) THEN
        RAISE EXCEPTION 'usage events carry data_ingested or data_egress only';
    END IF;
    WITH new AS (
        INSERT INTO usage_events (event_id, tenant_id, ts, resource, quantity, unit, source, metadata)
        SELECT * FROM unnest(p_ids, p_tenants, p_ts, p_resources, p_quantities, p_units, p_sources, p_metadata)
        ORDER BY 1  -- one lock order for every writer
        ON CONFLICT (event_id) DO NOTHING
        RETURNING tenant_id, resource, (ts AT TIME ZONE 'UTC')::date AS day, quantity
    ), counted AS (
        INSERT INTO usage (tenant_id, metric, day, value)
        SELECT tenant_id, resource, day, sum(quantity) FROM new
        GROUP BY tenant_id, resource, day ORDER BY tenant_id, resource, day
        ON CONFLICT (tenant_id, metric, day) DO UPDATE SET value = usage.value + excluded.value, updated_at = now()
        RETURNING 1
    )
    SELECT count(*) INTO n FROM new;
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION sensormine_store_usage_events(text[], text[], timestamptz[], text[], bigint[], text[], text[], jsonb[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensormine_store_usage_events(text[], text[], timestamptz[], text[], bigint[], text[], text[], jsonb[])
    TO sensormine_ingest, sensormine_metering;
