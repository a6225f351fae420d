-- Daily usage per tenant and resource (the `usage_daily` Dagster asset writes it, with its Delta
-- copy {lake}/usage_daily), the daily storage snapshot it takes, and the meter events sent to Stripe.

-- One row per tenant, day and metered resource; a day is rewritten whole by its asset run.
CREATE TABLE usage_daily (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    day         date NOT NULL,
    resource    text NOT NULL,
    quantity    numeric NOT NULL CHECK (quantity >= 0),
    unit        text NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day, resource)
);

-- What a tenant holds, measured once on (or the day after) the day it is attributed to: a backfill
-- of an older day keeps the measurement it finds (today's sizes say nothing about that day).
CREATE TABLE tenant_usage_snapshots (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    day         date NOT NULL,
    devices     bigint NOT NULL CHECK (devices >= 0),
    hot_bytes   bigint NOT NULL CHECK (hot_bytes >= 0),
    lake_bytes  bigint NOT NULL CHECK (lake_bytes >= 0),
    taken_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day)
);

-- Meter events Stripe acknowledged, by their identifier (derived from tenant, resource, day and the
-- correction's number): a re-run or backfill finds them here and sends nothing again; what is
-- reported for a tenant-day is the sum of the events not cancelled.
CREATE TABLE stripe_meter_events (
    identifier  text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants(id),
    day         date NOT NULL,
    resource    text NOT NULL,
    event_name  text NOT NULL,
    value       bigint NOT NULL CHECK (value >= 0),
    sent_at     timestamptz NOT NULL DEFAULT now(),
    canceled_at timestamptz            -- cancelled at Stripe by a MeterEventAdjustment (a correction)
);
CREATE INDEX stripe_meter_events_tenant_day ON stripe_meter_events (tenant_id, day);

CALL sensormine_billing_table('usage_daily');
CALL sensormine_billing_table('tenant_usage_snapshots');
CALL sensormine_billing_table('stripe_meter_events');

-- Meters join the catalogue ("meter:api_calls").
ALTER TABLE stripe_catalog DROP CONSTRAINT stripe_catalog_key_check;
ALTER TABLE stripe_catalog ADD CONSTRAINT stripe_catalog_key_check
    CHECK (key ~ '^(product|price|meter):[a-z_]+(:[a-z]+)?$');
