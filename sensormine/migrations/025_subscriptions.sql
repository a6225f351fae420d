-- A tenant's subscription at Stripe: which plan it pays for, as Stripe last answered. The plan the
-- platform applies (tenants.plan) follows it while the subscription is active or trialing.
CREATE TABLE tenant_subscriptions (
    tenant_id               text PRIMARY KEY REFERENCES tenants(id),
    stripe_subscription_id  text NOT NULL UNIQUE,
    stripe_item_id          text NOT NULL,
    plan                    text NOT NULL CHECK (plan IN ('free', 'pro')),
    billing_interval        text NOT NULL CHECK (billing_interval IN ('month', 'year')),
    status                  text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE tenant_subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_subscriptions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_subscriptions_tenant_isolation ON tenant_subscriptions
    USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) OR (SELECT sensormine_is_platform()));

GRANT SELECT ON tenant_subscriptions TO sensormine_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_subscriptions TO sensormine_writer;
-- The metering role (billing runs) reads every tenant's subscription.
GRANT SELECT ON tenant_subscriptions TO sensormine_metering;
CREATE POLICY tenant_subscriptions_metering ON tenant_subscriptions FOR SELECT TO sensormine_metering USING (true);
