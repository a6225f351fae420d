-- The stream processor rebuilds its state from the hot store after a restart or a rebalance, once the
-- hot-store consumer has stored the offsets it has handled: it reads them (no tenant data here).
GRANT SELECT ON ingest_offsets TO sensormine_alerts;
