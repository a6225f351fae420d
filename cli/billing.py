"""`sensormine billing sync-catalog|sync-customers [--update]`: what Sensormine keeps at Stripe, created once.

Both run as the metering role and may be re-run at any time: what is recorded is kept, what is
missing is created (`sensormine.billing.stripe_sync`). They talk to SENSORMINE_STRIPE_API_BASE
(stripe-mock from `sensormine services up`) with SENSORMINE_STRIPE_API_KEY.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import stripe
import typer

from cli.common import fail
from sensormine.billing.stripe_sync import SyncReport, sync_catalog, sync_customers
from sensormine.clients.postgres import METERING, connect, migrate_database
from sensormine.clients.stripe_api import BillingNotConfigured, make_stripe_client
from sensormine.settings import get_settings

app = typer.Typer(help="Billing at Stripe: the plan catalogue and a customer per tenant.", no_args_is_help=True)


Sync = Callable[[psycopg.Connection, stripe.StripeClient, Callable[[str], None]], SyncReport]


def _run(what: str, sync: Sync) -> None:
    settings = get_settings()
    try:
        client = make_stripe_client(settings)
        migrate_database(settings)
        with connect(settings, role=METERING) as conn:
            report = sync(conn, client, typer.echo)
    except BillingNotConfigured as exc:
        fail(str(exc))
    except stripe.StripeError as exc:
        fail(f"Stripe refused or could not be reached ({type(exc).__name__}: {exc}); what was made so far is "
             "recorded, run the command again once Stripe answers")  # fmt: skip
    updated = f", {len(report.updated)} updated" if report.updated else ""
    typer.echo(f"{what}: {len(report.created)} created{updated}, {len(report.kept)} already at Stripe")


@app.command("sync-catalog")
def sync_catalog_command() -> None:
    """Create the plans' products and prices (Free $0, Pro $99/month or $990/year, Enterprise) unless made."""
    _run("catalogue", sync_catalog)


@app.command("sync-customers")
def sync_customers_command(
    update: bool = typer.Option(False, "--update", help="Also send existing customers their tenant's current name"),
) -> None:
    """Create a Stripe customer for every tenant that has none yet, and record its id on the tenant."""
    _run("customers", lambda conn, client, progress: sync_customers(conn, client, progress, update=update))
