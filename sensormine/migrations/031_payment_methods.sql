-- Payment methods attached to a tenant's Stripe customer (cards collected by Stripe Elements with a
-- SetupIntent; only Stripe sees card numbers): what Stripe answered, and which one invoices charge.
CREATE TABLE tenant_payment_methods (
    stripe_payment_method_id text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants(id),
    type        text NOT NULL,
    brand       text,
    last4       text,
    exp_month   integer,
    exp_year    integer,
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tenant_payment_methods_one_default ON tenant_payment_methods (tenant_id) WHERE is_default;
CALL sensormine_billing_table('tenant_payment_methods');
GRANT INSERT, UPDATE, DELETE ON tenant_payment_methods TO sensormine_writer;
