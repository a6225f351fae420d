-- Anomaly models (docs/anomaly.md): the registry of trained versions, and metering of inference.
--
-- A model is trained per device type across every tenant that has devices of that type, so the
-- registry has no tenant column and no row-level security: each row is platform metadata (which
-- features, which window, how it scored on its training rows) plus the ONNX graph. The graph is
-- derived from several tenants' readings (an IsolationForest's split points lie inside the
-- ranges it saw), so it is readable only by the platform's own processes, never by API callers.

CREATE TABLE anomaly_models (
    version        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_type    text NOT NULL CHECK (device_type <> ''),
    features       text[] NOT NULL CHECK (cardinality(features) > 0),
    window_start   timestamptz NOT NULL,
    window_end     timestamptz NOT NULL,
    training_rows  bigint NOT NULL CHECK (training_rows > 0),
    metrics        jsonb NOT NULL DEFAULT '{}',
    onnx           bytea NOT NULL,
    onnx_sha256    text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (window_end >= window_start)
);
-- The newest version of a device type (what scoring loads).
CREATE INDEX anomaly_models_type_version ON anomaly_models (device_type, version DESC);

-- lake (Dagster): trains and registers versions, and loads them to score the lake.
GRANT SELECT, INSERT ON anomaly_models TO sensormine_lake;
-- alerts (the stream processor's role): loads the newest versions to score readings as they arrive.
GRANT SELECT ON anomaly_models TO sensormine_alerts;

-- Scored rows per tenant and UTC day, metric 'ml_inference' of the `usage` table, added once per
-- flush id exactly as ledger.write_batch adds API calls. The scorers run as sensormine_lake and
-- sensormine_alerts, which may neither read nor change `usage`: this function (the owner's) adds
-- their counts and nothing else, so neither role can read usage or touch any other metric.
CREATE POLICY usage_ml_inference_definer ON usage FOR ALL TO sensormine_owner
    USING (metric = 'ml_inference') WITH CHECK (metric = 'ml_inference');

CREATE FUNCTION sensormine_meter_ml_inference(p_flush_id text, p_tenant_ids text[], p_days date[], p_counts bigint[])
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF cardinality(p_tenant_ids) <> cardinality(p_days) OR cardinality(p_days) <> cardinality(p_counts) THEN
        RAISE EXCEPTION 'tenant ids, days and counts differ in length';
    END IF;
    INSERT INTO usage_flushes (flush_id, rows, total)
    VALUES (p_flush_id, cardinality(p_counts), (SELECT coalesce(sum(c), 0) FROM unnest(p_counts) AS c))
    ON CONFLICT (flush_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;  -- this batch is already counted
    END IF;
    INSERT INTO usage (tenant_id, metric, day, value)
    SELECT t, 'ml_inference', d, sum(c) FROM unnest(p_tenant_ids, p_days, p_counts) AS u(t, d, c)
    GROUP BY t, d ORDER BY t, d  -- one lock order for every writer, as write_batch
    ON CONFLICT (tenant_id, metric, day) DO UPDATE SET value = usage.value + excluded.value, updated_at = now();
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION sensormine_meter_ml_inference(text, text[], date[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensormine_meter_ml_inference(text, text[], date[], bigint[])
    TO sensormine_lake, sensormine_alerts;
