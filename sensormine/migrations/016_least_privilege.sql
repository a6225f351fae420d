-- No superuser at run time (docs/decisions.md, "No superuser at run time").
-- The roles come from bootstrap_roles (the launcher runs it; elsewhere `sensormine db bootstrap`):
-- this migration runs as their owner and gives each function role only what its work needs.
-- Logins hold nothing themselves (NOINHERIT); a connection takes one function role.

DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_auth')
       OR NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_ingest')
       OR NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_metering')
       OR NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_lake') THEN
        RAISE EXCEPTION 'the run-time roles are missing: run `sensormine db bootstrap` as a superuser first';
    END IF;
END $$;

-- Policies bind the tables' owner too: only the function roles' own policies let rows through.
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
ALTER TABLE devices FORCE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
ALTER TABLE telemetry FORCE ROW LEVEL SECURITY;
ALTER TABLE device_schemas FORCE ROW LEVEL SECURITY;
ALTER TABLE device_profiles FORCE ROW LEVEL SECURITY;
ALTER TABLE device_status FORCE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
ALTER TABLE usage FORCE ROW LEVEL SECURITY;
ALTER TABLE tenant_events FORCE ROW LEVEL SECURITY;
ALTER TABLE hot_write_log FORCE ROW LEVEL SECURITY;
ALTER TABLE dead_letters FORCE ROW LEVEL SECURITY;
ALTER TABLE dlq_replays FORCE ROW LEVEL SECURITY;
ALTER TABLE lake_compactions FORCE ROW LEVEL SECURITY;

-- The owner's security-definer functions (device quota across a quota group, tenant events)
-- read the hierarchy and the devices of every tenant, and record events.
CREATE POLICY tenants_definer ON tenants FOR SELECT TO sensormine_owner USING (true);
CREATE POLICY devices_definer ON devices FOR SELECT TO sensormine_owner USING (true);
CREATE POLICY tenant_events_definer ON tenant_events FOR ALL TO sensormine_owner USING (true) WITH CHECK (true);

-- tenant-scoped writes take revisions and ids from sequences (device profiles, audit entries).
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO sensormine_writer;

-- auth: who is calling, before the caller's tenants are known (tokens, API keys, device keys),
-- and ending sessions (token_version) and recording a key's last use.
GRANT SELECT ON tenants, users, api_keys, devices TO sensormine_auth;
GRANT UPDATE ON users, api_keys TO sensormine_auth;
CREATE POLICY tenants_auth ON tenants FOR SELECT TO sensormine_auth USING (true);
CREATE POLICY users_auth ON users FOR ALL TO sensormine_auth USING (true) WITH CHECK (true);
CREATE POLICY api_keys_auth ON api_keys FOR ALL TO sensormine_auth USING (true) WITH CHECK (true);
CREATE POLICY devices_auth ON devices FOR SELECT TO sensormine_auth USING (true);
GRANT EXECUTE ON FUNCTION sensormine_quota_tenant(text), sensormine_effective_plan(text),
    sensormine_tenant_ancestors(text) TO sensormine_auth;

-- ingest: every tenant's readings into the hot store (no reading back), dead letters and their
-- replays, Kafka offsets, device status, and the registry and schemas that validation needs.
GRANT SELECT ON tenants, devices, device_schemas, device_profiles TO sensormine_ingest;
GRANT INSERT ON telemetry, hot_write_log TO sensormine_ingest;
GRANT SELECT, INSERT, UPDATE ON ingest_offsets, device_status TO sensormine_ingest;
GRANT SELECT, INSERT, UPDATE, DELETE ON dead_letters, dlq_replays TO sensormine_ingest;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO sensormine_ingest;
CREATE POLICY tenants_ingest ON tenants FOR SELECT TO sensormine_ingest USING (true);
CREATE POLICY devices_ingest ON devices FOR SELECT TO sensormine_ingest USING (true);
CREATE POLICY device_schemas_ingest ON device_schemas FOR SELECT TO sensormine_ingest USING (true);
CREATE POLICY device_profiles_ingest ON device_profiles FOR SELECT TO sensormine_ingest USING (true);
CREATE POLICY telemetry_ingest ON telemetry FOR INSERT TO sensormine_ingest WITH CHECK (true);
CREATE POLICY hot_write_log_ingest ON hot_write_log FOR INSERT TO sensormine_ingest WITH CHECK (true);
CREATE POLICY device_status_ingest ON device_status FOR ALL TO sensormine_ingest USING (true) WITH CHECK (true);
CREATE POLICY dead_letters_ingest ON dead_letters FOR ALL TO sensormine_ingest USING (true) WITH CHECK (true);
CREATE POLICY dlq_replays_ingest ON dlq_replays FOR ALL TO sensormine_ingest USING (true) WITH CHECK (true);
GRANT EXECUTE ON FUNCTION sensormine_quota_tenant(text), sensormine_effective_plan(text),
    sensormine_tenant_ancestors(text) TO sensormine_ingest;

-- metering: API-call counts flushed from Redis, the flush ledger, and quota warnings.
GRANT SELECT ON tenants, devices TO sensormine_metering;
GRANT SELECT, INSERT, UPDATE, DELETE ON usage, usage_flushes TO sensormine_metering;
GRANT SELECT, INSERT ON tenant_events TO sensormine_metering;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO sensormine_metering;
CREATE POLICY tenants_metering ON tenants FOR SELECT TO sensormine_metering USING (true);
CREATE POLICY devices_metering ON devices FOR SELECT TO sensormine_metering USING (true);
CREATE POLICY usage_metering ON usage FOR ALL TO sensormine_metering USING (true) WITH CHECK (true);
CREATE POLICY tenant_events_metering ON tenant_events FOR ALL TO sensormine_metering USING (true) WITH CHECK (true);
GRANT EXECUTE ON FUNCTION sensormine_quota_group(text), sensormine_device_quota_usage(text),
    sensormine_record_tenant_event(text, text, jsonb, text), sensormine_quota_tenant(text),
    sensormine_effective_plan(text), sensormine_tenant_ancestors(text) TO sensormine_metering;

-- lake: compaction reads the hot store and records what the lake holds; quality checks read it;
-- retention drops whole day partitions through the function below.
GRANT SELECT ON tenants, devices, device_schemas, telemetry TO sensormine_lake;
GRANT SELECT, DELETE ON hot_write_log TO sensormine_lake;
GRANT SELECT, INSERT, UPDATE, DELETE ON lake_compactions TO sensormine_lake;
CREATE POLICY tenants_lake ON tenants FOR SELECT TO sensormine_lake USING (true);
CREATE POLICY devices_lake ON devices FOR SELECT TO sensormine_lake USING (true);
CREATE POLICY device_schemas_lake ON device_schemas FOR SELECT TO sensormine_lake USING (true);
CREATE POLICY telemetry_lake ON telemetry FOR SELECT TO sensormine_lake USING (true);
CREATE POLICY hot_write_log_lake ON hot_write_log FOR ALL TO sensormine_lake USING (true) WITH CHECK (true);
CREATE POLICY lake_compactions_lake ON lake_compactions FOR ALL TO sensormine_lake USING (true) WITH CHECK (true);

-- Day partitions are made and dropped by the owner, on the writers' behalf. A partition has no
-- policies of its own (COPY cannot run under row-level security): only sensormine_ingest may insert
-- into it directly, nobody may read it directly, and every read goes through telemetry's policies.
CREATE FUNCTION sensormine_ensure_day_partitions(days date[]) RETURNS date[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    d date;
    name text;
    created date[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(7351002);
    FOREACH d IN ARRAY days LOOP
        name := 'telemetry_p' || to_char(d, 'YYYYMMDD');
        IF to_regclass(format('public.%I', name)) IS NULL THEN
            EXECUTE format('CREATE TABLE public.%I PARTITION OF public.telemetry FOR VALUES FROM (%L) TO (%L)',
                           name, d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00');
            EXECUTE format('GRANT INSERT ON public.%I TO sensormine_ingest', name);
            EXECUTE format('GRANT SELECT ON public.%I TO sensormine_lake', name);
            created := created || d;
        END IF;
    END LOOP;
    RETURN created;
END $$;
REVOKE ALL ON FUNCTION sensormine_ensure_day_partitions(date[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensormine_ensure_day_partitions(date[]) TO sensormine_ingest, sensormine_lake;

-- Retention: lock a past day's partition (writers wait), and detach and drop it.
CREATE FUNCTION sensormine_lock_day_partition(d date) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    EXECUTE format('LOCK TABLE public.%I IN ACCESS EXCLUSIVE MODE', 'telemetry_p' || to_char(d, 'YYYYMMDD'));
END $$;
CREATE FUNCTION sensormine_drop_day_partition(d date) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    name text := 'telemetry_p' || to_char(d, 'YYYYMMDD');
BEGIN
    EXECUTE format('ALTER TABLE public.telemetry DETACH PARTITION public.%I', name);
    EXECUTE format('DROP TABLE public.%I', name);
END $$;
REVOKE ALL ON FUNCTION sensormine_lock_day_partition(date), sensormine_drop_day_partition(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensormine_lock_day_partition(date), sensormine_drop_day_partition(date)
    TO sensormine_lake;

-- Partitions made before this migration.
DO $$ DECLARE r record; BEGIN
    FOR r IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'telemetry'::regclass LOOP
        EXECUTE format('GRANT INSERT ON public.%I TO sensormine_ingest', r.relname);
        EXECUTE format('GRANT SELECT ON public.%I TO sensormine_lake', r.relname);
    END LOOP;
END $$;
