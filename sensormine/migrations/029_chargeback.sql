-- How a parent tenant allocates its invoice to the sub-tenants sharing its plan (docs/billing.md,
-- "Chargeback"): one policy per paying tenant.
CREATE TABLE chargeback_policies (
    tenant_id   text PRIMARY KEY REFERENCES tenants(id),
    strategy    text NOT NULL CHECK (strategy IN ('direct', 'proportional_devices', 'proportional_readings',
                                                  'fixed_percent', 'fixed_amount', 'showback')),
    shares      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(shares) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CALL sensormine_billing_table('chargeback_policies');
GRANT INSERT, UPDATE, DELETE ON chargeback_policies TO sensormine_writer;
