-- Alarm rules, alarms and their history, notification channels and escalation policies (docs/alerts.md).
-- Rules belong to a tenant and cascade to its sub-tenants (a sub-tenant's rule of the same name
-- overrides an inherited one). An alarm belongs to the device's tenant; at most one is open per
-- rule x device. The evaluator (role sensormine_alerts, made by bootstrap_roles) reads every
-- tenant's rules and devices and writes every tenant's alarms; API callers read and act on the
-- alarms of their visible tenants.

DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sensormine_alerts') THEN
        RAISE EXCEPTION 'the role sensormine_alerts is missing: run `sensormine db bootstrap` as a superuser first';
    END IF;
END $$;

CREATE SEQUENCE alert_rule_revisions;

-- Where notifications go: e-mail addresses, phone numbers (SMS), or one webhook URL with its
-- signing secret (shown once, when the channel is made).
CREATE TABLE alert_channels (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    id          text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    kind        text NOT NULL CHECK (kind IN ('email', 'webhook', 'sms')),
    targets     text[] NOT NULL CHECK (cardinality(targets) BETWEEN 1 AND 50),
    secret      text,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK ((kind = 'webhook') = (secret IS NOT NULL))
);

-- Who is told when: levels [{"after_s": 0, "channels": [...]}, {"after_s": 900, "channels": [...]}]
-- counted from the raise, while the alarm is active and unacknowledged; reminders every repeat_s
-- at the last level reached until it is acknowledged or cleared.
CREATE TABLE escalation_policies (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    id          text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    name        text NOT NULL,
    levels      jsonb NOT NULL CHECK (jsonb_typeof(levels) = 'array' AND jsonb_array_length(levels) BETWEEN 1 AND 10),
    repeat_s    double precision CHECK (repeat_s > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE alert_rules (
    tenant_id    text NOT NULL REFERENCES tenants(id),
    id           text NOT NULL CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$'),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description  text NOT NULL DEFAULT '',
    severity     text NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning', 'info')),
    condition    jsonb NOT NULL CHECK (jsonb_typeof(condition) = 'object'),
    scope        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(scope) = 'object'),
    for_s        double precision NOT NULL DEFAULT 0 CHECK (for_s >= 0),
    enabled      boolean NOT NULL DEFAULT true,
    cascade      boolean NOT NULL DEFAULT true,
    notify       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(notify) = 'object'),  -- {"emails": [...]}
    policy_id    text,       -- an escalation policy of the rule's tenant
    revision     bigint NOT NULL DEFAULT nextval('alert_rule_revisions'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, name)
);
CREATE TRIGGER alert_rules_touch BEFORE UPDATE ON alert_rules
    FOR EACH ROW EXECUTE FUNCTION sensormine_touch_updated_at();

CREATE TABLE alarms (
    tenant_id        text NOT NULL REFERENCES tenants(id),
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    rule_tenant_id   text NOT NULL,      -- the rule's owner (the tenant or an ancestor)
    rule_id          text NOT NULL,      -- no foreign key: alarms outlive a deleted rule
    rule_name        text NOT NULL,
    severity         text NOT NULL,
    condition_text   text NOT NULL,
    device_id        text NOT NULL,
    status           text NOT NULL CHECK (status IN ('active', 'cleared')),
    acknowledged     boolean NOT NULL DEFAULT false,
    -- Cleared by hand while the condition still held: stays the open alarm of its rule x device
    -- (repeats change nothing) until the condition clears, so the next message does not undo it.
    latched          boolean NOT NULL DEFAULT false,
    metric           text,
    first_value      double precision,
    last_value       double precision,
    count            integer NOT NULL DEFAULT 1,
    raised_at        timestamptz NOT NULL,
    last_at          timestamptz NOT NULL,
    cleared_at       timestamptz,
    cleared_by       text,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    assignee         text,
    -- Escalation (the rule's policy, copied at the raise): the level notified so far, and when the
    -- next level or reminder is due (null: nothing more; acknowledging or clearing stops it).
    policy_tenant_id text,
    policy_id        text,
    escalation_level integer NOT NULL DEFAULT 0,
    escalation_from  timestamptz,        -- wall-clock time of the raise: levels count from it
    next_notify_at   timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX alarms_open ON alarms (tenant_id, rule_tenant_id, rule_id, device_id)
    WHERE status = 'active' OR latched;
CREATE INDEX alarms_by_time ON alarms (tenant_id, raised_at DESC, id);
CREATE INDEX alarms_due ON alarms (next_notify_at) WHERE next_notify_at IS NOT NULL;
CREATE TRIGGER alarms_touch BEFORE UPDATE ON alarms
    FOR EACH ROW EXECUTE FUNCTION sensormine_touch_updated_at();

CREATE TABLE alarm_events (
    tenant_id   text NOT NULL,
    id          bigserial PRIMARY KEY,
    alarm_id    uuid NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN ('raised', 'cleared', 'acknowledged', 'commented', 'assigned',
                                          'escalated', 'reminded')),
    actor       text NOT NULL,   -- 'rule', or who acted (user:<id>, key:<id>, cli)
    event_id    text,            -- the evaluator's transition id: evaluating a reading again adds nothing
    detail      jsonb NOT NULL DEFAULT '{}',
    FOREIGN KEY (tenant_id, alarm_id) REFERENCES alarms (tenant_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX alarm_events_event_id ON alarm_events (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX alarm_events_alarm ON alarm_events (tenant_id, alarm_id, id);

-- Every notification attempt's outcome: the delivery log.
CREATE TABLE alarm_deliveries (
    tenant_id    text NOT NULL,
    id           bigserial PRIMARY KEY,
    alarm_id     uuid NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    state        text NOT NULL,      -- what was notified: raised, escalated, reminder, cleared
    level        integer NOT NULL DEFAULT 1,
    channel      text NOT NULL,      -- email, webhook, sms
    target       text NOT NULL,
    status       text NOT NULL CHECK (status IN ('delivered', 'failed', 'dead')),
    attempts     integer NOT NULL,
    error        text,
    FOREIGN KEY (tenant_id, alarm_id) REFERENCES alarms (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX alarm_deliveries_alarm ON alarm_deliveries (tenant_id, alarm_id, id);

ALTER TABLE alarm_deliveries ENABLE ROW LEVEL SECURITY;
ALTER TABLE alarm_deliveries FORCE ROW LEVEL SECURITY;
CREATE POLICY alarm_deliveries_tenant_isolation ON alarm_deliveries
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));
ALTER TABLE alert_channels ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_channels FORCE ROW LEVEL SECURITY;
ALTER TABLE escalation_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE escalation_policies FORCE ROW LEVEL SECURITY;
CREATE POLICY alert_channels_tenant_isolation ON alert_channels
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));
CREATE POLICY escalation_policies_tenant_isolation ON escalation_policies
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));
ALTER TABLE alert_rules ENABLE ROW LEVEL SECURITY;
ALTER TABLE alert_rules FORCE ROW LEVEL SECURITY;
ALTER TABLE alarms ENABLE ROW LEVEL SECURITY;
ALTER TABLE alarms FORCE ROW LEVEL SECURITY;
ALTER TABLE alarm_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE alarm_events FORCE ROW LEVEL SECURITY;
CREATE POLICY alert_rules_tenant_isolation ON alert_rules
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));
CREATE POLICY alarms_tenant_isolation ON alarms
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));
CREATE POLICY alarm_events_tenant_isolation ON alarm_events
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));

-- API callers: rules are written by the writer role; alarms are acted on (acknowledge, clear,
-- comment, assign), never created or deleted through the API.
GRANT SELECT ON alert_rules, alarms, alarm_events, alarm_deliveries, escalation_policies TO sensormine_reader;
-- Channel secrets: readers see channels without them (the API never shows a secret after creation).
GRANT SELECT (tenant_id, id, kind, targets, enabled, created_at) ON alert_channels TO sensormine_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON alert_rules, alert_channels, escalation_policies TO sensormine_writer;
GRANT SELECT, UPDATE ON alarms TO sensormine_writer;
GRANT SELECT, INSERT ON alarm_events TO sensormine_writer;
GRANT USAGE ON SEQUENCE alert_rule_revisions, alarm_events_id_seq TO sensormine_writer;

-- The evaluator: every tenant's rules, devices and hierarchy, recent readings; every tenant's alarms.
GRANT SELECT ON tenants, devices, device_status, alert_rules, alert_channels, escalation_policies TO sensormine_alerts;
-- The evaluator rebuilds its state after a restart by replaying the recent hot store (never writes it).
GRANT SELECT ON telemetry TO sensormine_alerts;
CREATE POLICY telemetry_alerts ON telemetry FOR SELECT TO sensormine_alerts USING (true);
GRANT SELECT, INSERT, UPDATE ON alarms TO sensormine_alerts;
GRANT SELECT, INSERT ON alarm_events, alarm_deliveries TO sensormine_alerts;
GRANT USAGE ON SEQUENCE alarm_events_id_seq, alarm_deliveries_id_seq TO sensormine_alerts;
CREATE POLICY tenants_alerts ON tenants FOR SELECT TO sensormine_alerts USING (true);
CREATE POLICY devices_alerts ON devices FOR SELECT TO sensormine_alerts USING (true);
CREATE POLICY device_status_alerts ON device_status FOR SELECT TO sensormine_alerts USING (true);
CREATE POLICY alert_rules_alerts ON alert_rules FOR SELECT TO sensormine_alerts USING (true);
CREATE POLICY alert_channels_alerts ON alert_channels FOR SELECT TO sensormine_alerts USING (true);
CREATE POLICY escalation_policies_alerts ON escalation_policies FOR SELECT TO sensormine_alerts USING (true);
CREATE POLICY alarms_alerts ON alarms FOR ALL TO sensormine_alerts USING (true) WITH CHECK (true);
CREATE POLICY alarm_events_alerts ON alarm_events FOR ALL TO sensormine_alerts USING (true) WITH CHECK (true);
CREATE POLICY alarm_deliveries_alerts ON alarm_deliveries FOR ALL TO sensormine_alerts USING (true) WITH CHECK (true);
