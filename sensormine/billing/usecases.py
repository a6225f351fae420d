"""Billing use cases shared by the API and the CLI: a tenant's sign-up makes its Stripe customer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import psycopg
import stripe

from sensormine.audit import log as audit
from sensormine.billing.stripe_sync import ensure_customer
from sensormine.clients.postgres import METERING, connect
from sensormine.clients.stripe_api import make_stripe_client
from sensormine.settings import Settings
from sensormine.tenancy.tenants import Tenant
from sensormine.tenancy.usecases import register_tenant

log = logging.getLogger(__name__)


def provision_customer(settings: Settings, tenant_id: str) -> str | None:
    """The tenant's Stripe customer, made now if billing is configured (`stripe_api_key`); its id.

    Best effort, after the tenant's commit: a tenant never fails to exist because Stripe is down.
    None when billing is not configured or Stripe failed (logged); `sensormine billing
    sync-customers` makes the missing ones later."""
    if not settings.stripe_api_key:
        return None
    try:
        with connect(settings, role=METERING) as conn:
            customer_id, _ = ensure_customer(conn, make_stripe_client(settings), tenant_id)
    except (stripe.StripeError, psycopg.Error) as exc:
        log.warning(
            "tenant %s created without its Stripe customer (%s: %s); `sensormine billing sync-customers` "
            "makes it once Stripe answers",
            tenant_id,
            type(exc).__name__,
            exc,
        )
        return None
    return customer_id


def sign_up_tenant(
    conn: psycopg.Connection,
    actor: audit.Actor,
    settings: Settings,
    tenant_id: str,
    name: str | None = None,
    parent_id: str | None = None,
    plan: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    features: Mapping[str, bool | None] | None = None,
    branding: Mapping[str, Any] | None = None,
) -> Tenant:
    """`register_tenant` (same arguments and errors), then the tenant's Stripe customer (`provision_customer`)."""
    tenant = register_tenant(
        conn, actor, settings, tenant_id, name, parent_id, plan, config=config, features=features, branding=branding
    )
    provision_customer(settings, tenant_id)
    return tenant
