-- Users and roles, API key roles, tenant configuration that cascades down the hierarchy,
-- the audit log, and a writer role so API writes run under row-level security too.

DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_writer') THEN
        CREATE ROLE sensormine_writer NOLOGIN;
    END IF;
END $$;

-- A sub-tenant without a plan of its own inherits its parent's (and shares its parent's quota);
-- a top-level tenant always has one.
ALTER TABLE tenants ALTER COLUMN plan DROP NOT NULL, ALTER COLUMN plan DROP DEFAULT;
ALTER TABLE tenants ADD CONSTRAINT tenants_root_has_plan CHECK (parent_id IS NOT NULL OR plan IS NOT NULL);
-- settings, feature flags and branding: each key set here overrides the same key inherited from above.
ALTER TABLE tenants
    ADD COLUMN settings   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    ADD COLUMN features   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(features) = 'object'),
    ADD COLUMN branding   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(branding) = 'object'),
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX tenants_parent ON tenants (parent_id);

-- A tenant and its ancestors, nearest first (depth 0 is the tenant itself).
CREATE FUNCTION sensormine_tenant_ancestors(t text) RETURNS TABLE (id text, plan text, depth int)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE a AS (
        SELECT tenants.id, tenants.parent_id, tenants.plan, 0 AS depth FROM tenants WHERE tenants.id = t
        UNION ALL
        SELECT p.id, p.parent_id, p.plan, a.depth + 1 FROM tenants p JOIN a ON p.id = a.parent_id
    )
    SELECT a.id, a.plan, a.depth FROM a
$$;

-- Whose plan (and quota) applies to a tenant: the nearest ancestor-or-self with a plan.
CREATE FUNCTION sensormine_quota_tenant(t text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT id FROM sensormine_tenant_ancestors(t) WHERE plan IS NOT NULL ORDER BY depth LIMIT 1
$$;

CREATE FUNCTION sensormine_effective_plan(t text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT plan FROM sensormine_tenant_ancestors(t) WHERE plan IS NOT NULL ORDER BY depth LIMIT 1
$$;

-- Platform administrators' sessions may see and create top-level tenants.
CREATE FUNCTION sensormine_is_platform() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('sensormine.platform', true), '') = 'on'
$$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenants_read ON tenants FOR SELECT
    USING (id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());
CREATE POLICY tenants_create ON tenants FOR INSERT
    WITH CHECK (parent_id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());
CREATE POLICY tenants_update ON tenants FOR UPDATE
    USING (id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());

-- People who log in. Platform administrators belong to no tenant; everyone else to exactly one.
CREATE TABLE users (
    id                text PRIMARY KEY,
    tenant_id         text REFERENCES tenants(id),
    email             text NOT NULL CHECK (email ~ '^[^@\s]+@[^@\s]+$'),
    name              text NOT NULL,
    role              text NOT NULL
        CHECK (role IN ('platform_admin', 'tenant_admin', 'operator', 'viewer', 'device')),
    password_hash     text NOT NULL,
    token_version     integer NOT NULL DEFAULT 0,   -- bumped on logout / password change: older tokens die
    created_at        timestamptz NOT NULL DEFAULT now(),
    disabled_at       timestamptz,
    CHECK ((role = 'platform_admin') = (tenant_id IS NULL))
);
CREATE UNIQUE INDEX users_email ON users (lower(email));
CREATE INDEX users_tenant ON users (tenant_id);

ALTER TABLE users ENABLE ROW LEVEL SECURITY;
CREATE POLICY users_tenant_isolation ON users
    USING (tenant_id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());

-- An API key acts with a role; its scopes narrow that role's permissions ('read' and 'write'
-- stand for every read and every write permission).
ALTER TABLE api_keys
    ADD COLUMN role text NOT NULL DEFAULT 'operator'
        CHECK (role IN ('tenant_admin', 'operator', 'viewer', 'device')),
    ADD COLUMN created_by text;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_keys_tenant_isolation ON api_keys
    USING (tenant_id = ANY (sensormine_visible_tenants()));

-- Who changed what. Written in the same transaction as the change it records.
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    tenant_id    text REFERENCES tenants(id),
    actor        text NOT NULL,            -- user:<id> | key:<id> | cli
    actor_role   text,
    action       text NOT NULL,            -- e.g. device.create, tenant.update
    target_type  text NOT NULL,
    target_id    text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant_id, id DESC);
ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY audit_log_tenant_isolation ON audit_log
    USING (tenant_id = ANY (sensormine_visible_tenants()) OR sensormine_is_platform());

-- The writer role: what API requests may change, always under the policies above.
GRANT SELECT, INSERT, UPDATE, DELETE ON devices, device_schemas, device_profiles, api_keys, users
    TO sensormine_writer;
GRANT SELECT, INSERT, UPDATE ON tenants TO sensormine_writer;
GRANT SELECT, INSERT ON audit_log TO sensormine_writer;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO sensormine_writer;
GRANT SELECT ON telemetry, lake_compactions, device_status TO sensormine_writer;
GRANT SELECT ON users, api_keys, audit_log TO sensormine_reader;
