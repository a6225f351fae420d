-- Connection profiles of polled/subscribed devices (OPC UA, Modbus): how a daemon reaches the
-- device and which of its points become which metrics. `revision` grows on every change, so a
-- running daemon notices an edited profile without a restart.
CREATE SEQUENCE device_profile_revisions;

CREATE TABLE device_profiles (
    tenant_id   text NOT NULL,
    device_id   text NOT NULL,
    protocol    text NOT NULL CHECK (protocol IN ('opcua', 'modbus')),
    profile     jsonb NOT NULL CHECK (jsonb_typeof(profile) = 'object'),
    revision    bigint NOT NULL DEFAULT nextval('device_profile_revisions'),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, id) ON DELETE CASCADE
);

CREATE INDEX device_profiles_protocol ON device_profiles (protocol, revision);

ALTER TABLE device_profiles ENABLE ROW LEVEL SECURITY;
CREATE POLICY device_profiles_tenant_isolation ON device_profiles
    USING (tenant_id = ANY (sensormine_visible_tenants()));
GRANT SELECT ON device_profiles TO sensormine_reader;
