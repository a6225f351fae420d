-- Stripe's webhooks: each event recorded once (its id), the order of what each tenant's events
-- changed, the payment state with its grace period, and invoices. What the tenant's admins are
-- told goes to tenant_events (with the outcome of its e-mail). All written by the metering role (the
-- design's Billing & Metering service).

-- Every event received, processed once: a second delivery finds its id here and changes nothing.
CREATE TABLE stripe_webhook_events (
    event_id      text PRIMARY KEY,
    type          text NOT NULL,
    stripe_created timestamptz NOT NULL,   -- when Stripe made the event (its "created")
    received_at   timestamptz NOT NULL DEFAULT now(),
    tenant_id     text REFERENCES tenants(id),
    outcome       text NOT NULL,           -- applied | stale | recorded | ignored: <why>
    payload       jsonb NOT NULL
);
CREATE INDEX stripe_webhook_events_tenant ON stripe_webhook_events (tenant_id, stripe_created);

-- The newest event applied per tenant and stream ("subscription", "payment"): an older event that
-- arrives later is recorded but changes nothing (Stripe does not promise delivery in order).
CREATE TABLE stripe_event_cursors (
    tenant_id   text NOT NULL REFERENCES tenants(id),
    stream      text NOT NULL CHECK (stream IN ('subscription', 'payment')),
    last_created timestamptz NOT NULL,
    last_event_id text NOT NULL,
    PRIMARY KEY (tenant_id, stream)
);

-- Whether the tenant's invoices are paid. A failed payment opens a grace period; once it has run
-- out the tenant is held to the free plan's limits until an invoice is paid.
CREATE TABLE tenant_payment_status (
    tenant_id     text PRIMARY KEY REFERENCES tenants(id),
    status        text NOT NULL CHECK (status IN ('paid', 'past_due')),
    past_due_since timestamptz,
    grace_until   timestamptz,
    invoice_id    text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'past_due') = (grace_until IS NOT NULL))
);

-- Invoices as Stripe last told (amounts in the currency's smallest unit, as Stripe sends them).
CREATE TABLE tenant_invoices (
    stripe_invoice_id text PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants(id),
    number        text,
    status        text NOT NULL,
    currency      text NOT NULL,
    amount_due    bigint NOT NULL,
    amount_paid   bigint NOT NULL,
    period_start  timestamptz,
    period_end    timestamptz,
    hosted_invoice_url text,
    stripe_created timestamptz NOT NULL,
    event_created timestamptz NOT NULL,    -- the event that wrote this row (older ones do not overwrite it)
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_invoices_tenant ON tenant_invoices (tenant_id, stripe_created DESC);

-- What every table of tenant rows kept by the billing service gets: row-level security (a tenant
-- sees its subtree, a platform session everything), read access for the API's roles, and full
-- access for the metering role. Later migrations call it for their billing tables.
CREATE PROCEDURE sensormine_billing_table(t text)
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY %I ON %I USING (tenant_id = ANY ((SELECT sensormine_visible_tenants())::text[]) '
                   'OR (SELECT sensormine_is_platform()))', t || '_tenant_isolation', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR ALL TO sensormine_metering USING (true) WITH CHECK (true)',
                   t || '_metering', t);
    EXECUTE format('GRANT SELECT ON %I TO sensormine_reader, sensormine_writer', t);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO sensormine_metering', t);
END $$;
REVOKE ALL ON PROCEDURE sensormine_billing_table(text) FROM PUBLIC;

CALL sensormine_billing_table('stripe_webhook_events');
CALL sensormine_billing_table('stripe_event_cursors');
CALL sensormine_billing_table('tenant_payment_status');
CALL sensormine_billing_table('tenant_invoices');
-- A billing notice's event records to whom it was mailed (or why not).
GRANT UPDATE (data) ON tenant_events TO sensormine_metering;

-- The webhooks change a tenant's subscription and plan, and audit what they did.
GRANT INSERT, UPDATE, DELETE ON tenant_subscriptions TO sensormine_metering;
CREATE POLICY tenant_subscriptions_metering_write ON tenant_subscriptions FOR ALL TO sensormine_metering
    USING (true) WITH CHECK (true);
GRANT UPDATE (plan, updated_at) ON tenants TO sensormine_metering;
GRANT INSERT ON audit_log TO sensormine_metering;
CREATE POLICY audit_log_metering ON audit_log FOR INSERT TO sensormine_metering WITH CHECK (true);
-- Notices go by e-mail to the tenant's administrators.
GRANT SELECT (id, tenant_id, email, role, disabled_at) ON users TO sensormine_metering;
CREATE POLICY users_metering ON users FOR SELECT TO sensormine_metering USING (true);

-- Whether a tenant's grace period for an unpaid invoice has run out (read whatever the caller's role).
CREATE POLICY tenant_payment_status_definer ON tenant_payment_status FOR SELECT TO sensormine_owner USING (true);
CREATE FUNCTION sensormine_payment_lapsed(t text) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT EXISTS (SELECT FROM tenant_payment_status p WHERE p.tenant_id = t AND p.grace_until <= now())
$$;

-- The plan the tenant has chosen (its own or inherited), whatever its payment state: retention keeps
-- data by it, so an unpaid invoice never deletes a tenant's history.
CREATE FUNCTION sensormine_contract_plan(t text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT plan FROM sensormine_tenant_ancestors(t) WHERE plan IS NOT NULL ORDER BY depth LIMIT 1
$$;
GRANT EXECUTE ON FUNCTION sensormine_contract_plan(text) TO sensormine_lake, sensormine_metering;

-- The plan in force: the nearest plan up the tree, or free while that plan's payer is past its grace.
CREATE OR REPLACE FUNCTION sensormine_effective_plan(t text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN sensormine_payment_lapsed(a.id) THEN 'free' ELSE a.plan END
    FROM sensormine_tenant_ancestors(t) a WHERE a.plan IS NOT NULL ORDER BY a.depth LIMIT 1
$$;
GRANT EXECUTE ON FUNCTION sensormine_payment_lapsed(text) TO sensormine_reader, sensormine_writer, sensormine_auth,
    sensormine_ingest, sensormine_metering, sensormine_lake, sensormine_alerts;
