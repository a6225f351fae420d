-- Devices through the REST API: free-form metadata, a last-modified time, and a list index by type.
-- (docs/device-identity.md "REST API", docs/schemas.md "REST API")

-- Metadata is a JSON object of the owner's labels (site, line, serial number, ...). The registry
-- allows 16 KiB of compact JSON; the check is a backstop with room for jsonb's spaced text form.
ALTER TABLE devices
    ADD COLUMN metadata   jsonb NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 65536),
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();

-- Any change to a device row (name, type, metadata, key rotation or revocation) moves updated_at.
CREATE FUNCTION sensormine_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER devices_touch BEFORE UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION sensormine_touch_updated_at();

-- GET /api/devices?device_type=...: pages of one type in id order; also which devices use a schema.
CREATE INDEX devices_tenant_type ON devices (tenant_id, device_type, id);
