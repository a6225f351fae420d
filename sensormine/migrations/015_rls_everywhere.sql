-- Row-level security on the tables with tenant rows that had none: dead letters (without Kafka),
-- their replays, and the lake's compaction records. Sessions see the rows of their visible
-- tenants; dead letters that name no (known) tenant only platform sessions.
-- tests/integration/test_rls.py fails on any table with a tenant_id column and no policy.
ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;
CREATE POLICY dead_letters_tenant_isolation ON dead_letters
    USING (tenant_id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());

ALTER TABLE dlq_replays ENABLE ROW LEVEL SECURITY;
CREATE POLICY dlq_replays_tenant_isolation ON dlq_replays
    USING (tenant_id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());

ALTER TABLE lake_compactions ENABLE ROW LEVEL SECURITY;
CREATE POLICY lake_compactions_tenant_isolation ON lake_compactions
    USING (tenant_id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());

GRANT SELECT ON dead_letters, dlq_replays TO sensormine_reader, sensormine_writer;
