"""Dagster resources: typed handles on the hot store and the lake, each building a `Settings`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg
import stripe

from sensormine.clients.postgres import LAKE, connect
from sensormine.clients.stripe_api import make_stripe_client
from sensormine.settings import Settings


class HotStoreResource(dg.ConfigurableResource):
    """The PostgreSQL hot store (telemetry, registry, lake_compactions)."""

    database_url: str

    def settings(self) -> Settings:
        """Platform settings pointing at this database."""
        return Settings(database_url=self.database_url)

    @contextmanager
    def connect(self, role: str = LAKE) -> Iterator[psycopg.Connection]:
        """A connection acting as the function `role` (the lake's by default), closed after the block."""
        with connect(self.settings(), role=role) as conn:
            yield conn


class StripeResource(dg.ConfigurableResource):
    """Stripe's API (stripe-mock in tests): the secret key and, for a mock, its base URL."""

    api_key: str | None = None
    api_base: str | None = None

    def client(self) -> stripe.StripeClient:
        """The SDK's client (BillingNotConfigured without a key)."""
        return make_stripe_client(Settings(stripe_api_key=self.api_key, stripe_api_base=self.api_base))


class LakeResource(dg.ConfigurableResource):
    """The Delta lake root: a local folder or s3://bucket/prefix, with its object-store credentials."""

    lake_uri: str | None = None
    state_dir: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"

    def settings(self) -> Settings:
        """Platform settings describing this lake (`lake_root`, `storage_options()`)."""
        # Every lake field is passed, None included, so these values win over any SENSORMINE_*
        # variable of the process that runs the asset: the resource config is the one source.
        fields: dict[str, object] = {
            "lake_uri": self.lake_uri,
            "s3_endpoint": self.s3_endpoint,
            "s3_access_key": self.s3_access_key,
            "s3_secret_key": self.s3_secret_key,
            "s3_region": self.s3_region,
        }
        if self.state_dir:
            fields["state_dir"] = Path(self.state_dir)
        return Settings(**fields)  # type: ignore[arg-type]

    @property
    def root(self) -> str:
        """The lake's root URI."""
        return self.settings().lake_root


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """`hot_store`, `lake` and `stripe` resources describing `settings`, for in-process runs (tests, tools).

    The deployed Definitions build theirs from SENSORMINE_* variables instead (definitions.py).
    """
    if not settings.database_url:
        raise ValueError("settings.database_url is not set")
    lake = LakeResource(
        lake_uri=settings.lake_root,
        state_dir=str(settings.state_dir),
        s3_endpoint=settings.s3_endpoint,
        s3_access_key=settings.s3_access_key,
        s3_secret_key=settings.s3_secret_key,
        s3_region=settings.s3_region,
    )
    return {
        "hot_store": HotStoreResource(database_url=settings.database_url),
        "lake": lake,
        "stripe": StripeResource(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base),
    }
