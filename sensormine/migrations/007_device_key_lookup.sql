-- Devices authenticate with their key alone (HTTP ingest): find a device by its key's hash.
CREATE UNIQUE INDEX devices_key_hash ON devices (key_hash);
