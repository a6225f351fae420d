-- Monthly usage per tenant and resource (the `usage_monthly` asset) and the invoice preview of the
-- month (the `invoice_preview` asset): plan price and overage per resource, Decimal money.

CREATE TABLE usage_monthly (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    month       date NOT NULL CHECK (extract(day FROM month) = 1),
    resource    text NOT NULL,
    quantity    numeric NOT NULL CHECK (quantity >= 0),
    unit        text NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, month, resource)
);

CREATE TABLE invoice_previews (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    month       date NOT NULL CHECK (extract(day FROM month) = 1),
    plan        text NOT NULL,
    currency    text NOT NULL,
    total       numeric,                 -- null: priced per contract (enterprise)
    lines       jsonb NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, month)
);

CALL sensormine_billing_table('usage_monthly');
CALL sensormine_billing_table('invoice_previews');
