-- The alarm-event outbox: a raised or cleared alarm the stream processor must publish to
-- {env}.{tenant}.alerts is written here in the transaction that changes the alarm, and deleted once
-- Kafka confirms the event. A crash between the commit and the confirmation, or an event Kafka
-- refused, leaves the row; the processor publishes it again later (docs/alerts.md).
CREATE TABLE alarm_outbox (
    tenant_id   text NOT NULL,
    alarm_id    uuid NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('raised', 'cleared')),
    due_at      timestamptz NOT NULL DEFAULT now(),  -- queued, or last taken for another attempt
    attempts    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, alarm_id, kind),
    FOREIGN KEY (tenant_id, alarm_id) REFERENCES alarms (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX alarm_outbox_due ON alarm_outbox (due_at);

ALTER TABLE alarm_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE alarm_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY alarm_outbox_tenant_isolation ON alarm_outbox
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));
GRANT SELECT, INSERT, UPDATE, DELETE ON alarm_outbox TO sensormine_alerts;
CREATE POLICY alarm_outbox_alerts ON alarm_outbox FOR ALL TO sensormine_alerts USING (true) WITH CHECK (true);
