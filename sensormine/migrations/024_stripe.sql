-- Stripe: a customer per tenant, and the plan catalogue (products and prices) created once.
-- stripe-mock (the test server) keeps no state and ignores Idempotency-Key, and Stripe's keys
-- expire after a day: what must not be created twice is recorded here, in the transaction that
-- learns its id.
ALTER TABLE tenants ADD COLUMN stripe_customer_id text UNIQUE;

-- Platform metadata, no tenant's rows: one row per catalogue entry ("product:pro", "price:pro:month").
CREATE TABLE stripe_catalog (
    key         text PRIMARY KEY CHECK (key ~ '^(product|price):[a-z]+(:[a-z]+)?$'),
    stripe_id   text NOT NULL UNIQUE,
    detail      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The billing work runs as the metering role (the design's Billing & Metering service): it reads
-- every tenant, writes only their Stripe customer id, and keeps the catalogue.
GRANT SELECT, INSERT, UPDATE ON stripe_catalog TO sensormine_metering;
GRANT UPDATE (stripe_customer_id) ON tenants TO sensormine_metering;
CREATE POLICY tenants_metering_stripe ON tenants FOR UPDATE TO sensormine_metering USING (true) WITH CHECK (true);
