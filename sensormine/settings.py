"""One place for configuration: every setting is read from SENSORMINE_* environment variables."""

from __future__ import annotations

import logging
import os
import secrets
import time
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_ENVS = frozenset({"dev", "test", "demo", "local"})
"""Environments where secrets may default to random ones generated into the state directory."""

log = logging.getLogger(__name__)


class Settings(BaseSettings):
    """Platform settings; unset service URLs select the embedded default."""

    model_config = SettingsConfigDict(env_prefix="SENSORMINE_", extra="ignore")

    env: str = Field("dev", description="Environment name; prefixes every Kafka topic.")
    state_dir: Path = Field(Path(".sensormine"), description="Where local services and the local lake live.")
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL of this process's login: a role without superuser or BYPASSRLS whose "
        "connections take the function roles they need (docs/decisions.md); passwords from the URL or PGPASSFILE.",
    )
    database_migrate_url: str | None = Field(
        None,
        description="PostgreSQL URL of the schema owner, used only to apply migrations (the launcher's "
        "sensormine_owner); unset: migrations use database_url.",
    )
    kafka_bootstrap: str | None = None
    mqtt_url: str | None = None
    redis_url: str | None = None
    lake_uri: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_region: str = "us-east-1"
    smtp_url: str | None = Field(
        None,
        description="Mail server for alarm e-mails, smtp://host:port (the launcher's local aiosmtpd sink); "
        "unset: the e-mail channel is off.",
    )
    smtp_from: str = Field("Sensormine <alerts@sensormine.local>", description="Sender of alarm e-mails.")
    notice_mail_interval_s: float = Field(
        5.0, gt=0, description="How often the API's notice mailer mails new quota and billing notices to admins."
    )
    mqtt_client_id: str | None = Field(
        None,
        description="The ingest daemon's MQTT client id, naming its persistent session "
        "(sensormine-ingest-{env} by default).",
    )
    mqtt_session_expiry_s: int = Field(
        86_400, description="How long the broker keeps queueing for a stopped ingest daemon."
    )
    mqtt_username: str | None = Field(
        None,
        description="MQTT user of the ingest daemon (the launcher's `sensormine-ingest` service client, "
        "allowed to subscribe to every telemetry topic and to publish nowhere); unset: anonymous.",
    )
    mqtt_password: str | None = Field(None, description="Password of `mqtt_username`.")
    mqtt_admin_username: str | None = Field(
        None,
        description="Admin user of Mosquitto's dynamic-security plugin (its `$CONTROL` API), through which "
        "the registry provisions device identities; unset: devices are not provisioned at the broker.",
    )
    mqtt_admin_password: str | None = Field(None, description="Password of `mqtt_admin_username`.")
    mqtt_tools_username: str | None = Field(
        None,
        description="A privileged publisher (publish and subscribe on sensormine/#) the launcher creates for "
        "tests, benchmarks and tools; leave unset in production, where devices publish with their own keys.",
    )
    mqtt_tools_password: str | None = Field(None, description="Password of `mqtt_tools_username`.")
    dynsec_timeout_s: float = Field(
        5.0, description="How long a dynamic-security control request may take (connect plus answer)."
    )
    api_key_header: str = "X-API-Key"
    jwt_secret: str | None = Field(
        None,
        description="Signs access and refresh tokens (HS256). Required outside development environments "
        "(env dev, test, demo, local), where a random one is generated into {state_dir}/jwt-secret when unset.",
    )
    metrics_token: str | None = Field(
        None,
        description="Bearer token Prometheus sends to scrape /metrics. Unset: in development environments a random "
        "one is generated into {state_dir}/metrics-token; elsewhere /metrics is off (404).",
    )
    quota_flush_interval_s: float = Field(
        5.0, description="How often each API process moves API-call counts from Redis to the usage table."
    )
    meter_ingest: bool = Field(
        True,
        description="Meter accepted payload bytes (usage resource data_ingested) in the hot-store writer's "
        "transaction; off only for the benchmark that measures what metering costs.",
    )
    egress_flush_interval_s: float = Field(
        5.0, description="How often each API process emits its response-byte counts (data_egress) as usage events."
    )
    storage_quota_recheck_s: float = Field(
        60.0,
        description="How long a writer keeps a tenant's storage-quota verdict before reading it again: readings "
        "of a group that stores its plan's limit are refused (dead-lettered), and an upgrade is honoured within this.",
    )
    limits_enabled: bool = Field(
        True,
        description="Enforce per-plan rate limits and monthly quotas on the API (and meter API calls and "
        "response bytes); off only for benchmarks that measure the routes themselves.",
    )
    latest_push: bool = Field(
        True,
        description="API processes keep the newest point of each series in memory, pushed by the hot-store "
        "writers through PostgreSQL notifications (GET /api/query/latest answers from it).",
    )
    jwt_access_ttl_s: int = Field(900, description="Lifetime of an access token.")
    jwt_refresh_ttl_s: int = Field(7 * 86_400, description="Lifetime of a refresh token.")
    auth_cache_ttl_s: float = Field(
        5.0,
        description="How long the API remembers a resolved credential. A revocation, logout or role change made "
        "through another API process takes effect within this time (at once in the process that made it).",
    )
    device_key_header: str = "X-Device-Key"
    device_offline_after_s: float = Field(300.0, description="A device not heard from for this long is offline.")
    alerts_in_process: bool = Field(
        True,
        description="Without Kafka, evaluate alarm rules behind the in-process write path (with Kafka the "
        "stream processor does).",
    )
    sms_url: str | None = Field(None, description="HTTP SMS provider endpoint (POST {to, text} with a bearer token).")
    sms_token: str | None = Field(None, description="Bearer token of the SMS provider.")
    stripe_api_key: str | None = Field(
        None, description="Stripe secret key (sk_...); `sensormine services up` exports stripe-mock's."
    )
    stripe_api_base: str | None = Field(
        None, description="Stripe API base URL; unset: Stripe itself (the launcher points it at stripe-mock)."
    )
    stripe_webhook_secret: str | None = Field(
        None,
        description="Signing secret of the Stripe webhook endpoint (whsec_...); unset: the webhook route answers 503. "
        "The launcher exports a local one (stripe-mock sends no webhooks).",
    )
    billing_grace_days: float = Field(
        7.0, ge=0, description="Days an unpaid invoice is tolerated before the free plan's limits apply."
    )
    aggregate_window_s: float = Field(60.0, gt=0, description="Window width of the stream's aggregates topic.")
    aggregate_slide_s: float | None = Field(
        None,
        gt=0,
        description="How often a window starts (it must divide the width): sliding windows; unset: tumbling.",
    )
    aggregate_grace_s: float = Field(
        10.0, ge=0, description="How late (event time) a reading may still join its window."
    )
    alerts_group: str = Field("sensormine-alerts", description="Consumer group of the stream processor.")
    alerts_outbox_retry_s: float = Field(
        30.0,
        gt=0,
        description="An alarm event Kafka has not confirmed this long after its alarm changed is published again.",
    )
    alerts_warmup_s: float = Field(
        900.0,
        ge=0,
        description="On start, the alarm evaluator replays this much of the hot store (at least the longest "
        "rule duration plus a minute) to rebuild its state; 0: start empty.",
    )
    alerts_tick_s: float = Field(5.0, gt=0, description="How often absence rules are checked.")
    alerts_refresh_s: float = Field(
        2.0, ge=0, description="How often the evaluator checks for changed rules, devices and tenants."
    )
    http_ingest_max_bytes: int = Field(10 << 20, description="Largest body POST /api/ingest accepts.")
    http_ingest_timeout_s: float = Field(10.0, description="How long POST /api/ingest waits for durability.")
    query_max_points: int = Field(1_000_000, description="Raw points one query may return.")
    consumer_group: str = "sensormine-hot-writer"
    consumer_batch_size: int = 20_000
    consumer_batch_ms: int = 200
    partition_days_ahead: int = 7
    partition_days_back: int = 7
    max_future_skew_s: int = 86_400
    buffer_dir: Path | None = Field(None, description="Store-and-forward buffers ({state_dir}/buffers by default).")
    buffer_max_bytes: int = Field(1 << 30, description="Size limit of one daemon's store-and-forward buffer.")
    buffer_drop: Literal["oldest", "newest"] = Field(
        "oldest", description="What a full buffer drops (counted, logged)."
    )
    buffer_link_timeout_s: float = Field(
        5.0, description="A delivery unconfirmed for this long means the link is down."
    )
    buffer_retry_s: float = Field(1.0, description="How often a buffer probes a link that is down.")
    lake_compaction_cron: str = Field(
        "5 * * * *",
        description="When telemetry_lake_hourly_schedule compacts today's partition of every tenant "
        "(a cron expression in UTC; hourly at :05 by default).",
    )
    hot_data_threshold_rows: int = Field(
        1_000_000, description="Rows a hot-store day must gain before hot_data_sensor compacts it early."
    )

    @property
    def is_development(self) -> bool:
        """Whether this is a development environment (dev, test, demo, local)."""
        return self.env in DEVELOPMENT_ENVS

    def generated_secret(self, name: str, *, what: str, variable: str) -> str:
        """A random secret kept in `{state_dir}/{name}` (0600), created on first use; development only.

        Every process of the state directory reads the same one; its creation is logged once, naming
        `variable` as the way to choose one.
        """
        return _state_dir_secret((self.state_dir / name).absolute(), what, variable)

    @property
    def lake_root(self) -> str:
        """The lake's root URI: SENSORMINE_LAKE_URI, or a folder in the state directory."""
        if self.lake_uri:
            return self.lake_uri.rstrip("/")
        return str((self.state_dir / "lake").resolve())

    @property
    def dlq_topic(self) -> str:
        """Kafka topic for rejected messages."""
        return f"{self.env}.dlq"

    @property
    def metering_topic(self) -> str:
        """Kafka topic of usage events (sensormine.metering.usage_events)."""
        return f"{self.env}.metering.events"

    def telemetry_topic(self, tenant_id: str) -> str:
        """Kafka topic that carries one tenant's readings."""
        return f"{self.env}.{tenant_id}.telemetry"

    def tenant_of_telemetry_topic(self, topic: str | None) -> str | None:
        """The tenant whose telemetry topic `topic` is (`telemetry_topic`'s inverse), or None."""
        prefix, suffix = f"{self.env}.", ".telemetry"
        if topic and topic.startswith(prefix) and topic.endswith(suffix) and len(topic) > len(prefix) + len(suffix):
            return topic[len(prefix) : -len(suffix)]
        return None

    def aggregates_topic(self, tenant_id: str) -> str:
        """Kafka topic of one tenant's windowed aggregates per device and metric."""
        return f"{self.env}.{tenant_id}.aggregates"

    def alerts_topic(self, tenant_id: str) -> str:
        """Kafka topic of one tenant's alarm events (raised, cleared)."""
        return f"{self.env}.{tenant_id}.alerts"

    @property
    def telemetry_topic_pattern(self) -> str:
        """Regex subscription matching every tenant's telemetry topic."""
        return rf"^{self.env}\.[^.]+\.telemetry$"

    def storage_options(self) -> dict[str, str]:
        """Object-store options for delta-rs when the lake lives on S3."""
        if not self.lake_root.startswith("s3://"):
            return {}
        opts = {
            "AWS_REGION": self.s3_region,
            # With an ETag conditional put, two writers cannot both create the same _delta_log
            # entry, so concurrent Dagster runs (backfills) stay safe on object storage.
            "aws_conditional_put": "etag",
        }
        if self.s3_endpoint:
            opts["AWS_ENDPOINT_URL"] = self.s3_endpoint
            opts["AWS_ALLOW_HTTP"] = "true"
        if self.s3_access_key:
            opts["AWS_ACCESS_KEY_ID"] = self.s3_access_key
        if self.s3_secret_key:
            opts["AWS_SECRET_ACCESS_KEY"] = self.s3_secret_key
        return opts


@lru_cache(maxsize=16)
def _state_dir_secret(path: Path, what: str, variable: str) -> str:
    """The random secret in `path`, created exclusively (mode 0600) when missing, so concurrent processes agree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            secret = path.read_text().strip()
            if len(secret) >= 32:
                return secret
            time.sleep(0.02)
        raise RuntimeError(f"{path} does not hold a secret; delete it to have a new one generated") from None
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    log.warning("%s is unset: %s with a random secret generated into %s (development only)", variable, what, path)
    return secret


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; call `reset_settings()` after changing the environment)."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings so the next `get_settings()` re-reads the environment."""
    get_settings.cache_clear()
