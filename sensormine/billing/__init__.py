"""Stripe customers, subscriptions, usage reports and sub-tenant chargeback (the billing issue); empty for now."""
