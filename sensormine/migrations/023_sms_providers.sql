-- A tenant's own SMS gateway (JSON over HTTP with a bearer token). Its sub-tenants' SMS channels use
-- it unless they have their own; with none up the tree, the deployment's (SENSORMINE_SMS_URL).
CREATE TABLE alert_sms_providers (
    tenant_id   text PRIMARY KEY REFERENCES tenants(id),
    url         text NOT NULL CHECK (url ~ '^https?://[^\s/]+(/\S*)?$'),
    token       text NOT NULL CHECK (length(token) BETWEEN 8 AND 512),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE alert_sms_providers ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_sms_providers FORCE ROW LEVEL SECURITY;
CREATE POLICY alert_sms_providers_tenant_isolation ON alert_sms_providers
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));

-- API callers: readers see where texts go, never the token; writers set and remove it.
GRANT SELECT (tenant_id, url, updated_at) ON alert_sms_providers TO sensormine_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON alert_sms_providers TO sensormine_writer;
-- The notifier sends through every tenant's gateway.
GRANT SELECT ON alert_sms_providers TO sensormine_alerts;
CREATE POLICY alert_sms_providers_alerts ON alert_sms_providers FOR SELECT TO sensormine_alerts USING (true);
