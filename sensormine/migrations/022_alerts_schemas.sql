-- The stream processor evaluates only what the hot store accepts: it validates each message as the
-- hot-store consumer does, against the device type's latest schema, so it reads the schemas.
GRANT SELECT ON device_schemas TO sensormine_alerts;
CREATE POLICY device_schemas_alerts ON device_schemas FOR SELECT TO sensormine_alerts USING (true);
