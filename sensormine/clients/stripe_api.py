"""Stripe: the official SDK's client, pointed at `stripe_api_base` when set (stripe-mock in tests)."""

from __future__ import annotations

import stripe

from sensormine.settings import Settings, get_settings


class BillingNotConfigured(RuntimeError):
    """No Stripe key: billing has nothing to talk to."""


def make_stripe_client(settings: Settings | None = None) -> stripe.StripeClient:
    """A client with the deployment's secret key (BillingNotConfigured without one); network errors are
    retried twice by the SDK, with the idempotency keys the callers pass."""
    settings = settings or get_settings()
    if not settings.stripe_api_key:
        raise BillingNotConfigured(
            "no Stripe key: set SENSORMINE_STRIPE_API_KEY (and SENSORMINE_STRIPE_API_BASE for a mock); "
            "`sensormine services up` starts stripe-mock and exports both in .sensormine/services.env"
        )
    if settings.stripe_api_base:
        return stripe.StripeClient(
            settings.stripe_api_key, base_addresses={"api": settings.stripe_api_base}, max_network_retries=2
        )
    return stripe.StripeClient(settings.stripe_api_key, max_network_retries=2)
