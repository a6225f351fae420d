"""Billing: the plan catalogue and a customer per tenant at Stripe (subscriptions, usage reports and
sub-tenant chargeback are the billing issue's next steps). docs/billing.md."""
