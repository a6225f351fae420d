"""Shared fixtures: real services from the launcher, a fresh database and Kafka namespace per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster
import psycopg
import pytest

from sensormine.settings import Settings, reset_settings

REPO = Path(__file__).resolve().parent.parent
SERVICE_VARS = (
    "SENSORMINE_DATABASE_URL",
    "SENSORMINE_MQTT_URL",
    "SENSORMINE_KAFKA_BOOTSTRAP",
    "SENSORMINE_REDIS_URL",
    "SENSORMINE_S3_ENDPOINT",
)


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """SENSORMINE_* URLs of running services: taken from the environment when all are set, else started."""
    if all(os.environ.get(v) for v in SERVICE_VARS):
        return {k: v for k, v in os.environ.items() if k.startswith("SENSORMINE_")}
    from sensormine.services.launcher import up

    env = up(state_dir=Path(os.environ.get("SENSORMINE_STATE_DIR", REPO / ".sensormine")))
    os.environ.update(env)
    reset_settings()
    return env


def _admin_url(url: str, dbname: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + dbname


@pytest.fixture
def database_url(services: dict[str, str]) -> Iterator[str]:
    """A new, migrated database for one test, dropped afterwards."""
    from sensormine.clients.postgres import migrate

    base = services["SENSORMINE_DATABASE_URL"]
    name = f"sm_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_admin_url(base, "postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _admin_url(base, name)
    with psycopg.connect(url) as conn:
        migrate(conn)
    yield url
    with psycopg.connect(_admin_url(base, "postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def settings(services: dict[str, str], database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own database, lake folder and Kafka topic namespace."""
    return Settings(
        env=(env := f"t{uuid.uuid4().hex[:8]}"),
        consumer_group=f"{env}-hot-writer",
        state_dir=tmp_path,
        database_url=database_url,
        kafka_bootstrap=services.get("SENSORMINE_KAFKA_BOOTSTRAP"),
        mqtt_url=services.get("SENSORMINE_MQTT_URL"),
        redis_url=services.get("SENSORMINE_REDIS_URL"),
        s3_endpoint=services.get("SENSORMINE_S3_ENDPOINT"),
        s3_access_key=services.get("SENSORMINE_S3_ACCESS_KEY", "test"),
        s3_secret_key=services.get("SENSORMINE_S3_SECRET_KEY", "test"),
        lake_uri=str(tmp_path / "lake"),
        mqtt_session_expiry_s=60,  # broker sessions of finished tests go away soon
        jwt_secret="test-signing-secret-" + uuid.uuid4().hex,
    )


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection to the test's database."""
    with psycopg.connect(settings.database_url) as c:
        yield c


@pytest.fixture
def dagster_instance() -> Iterator[dagster.DagsterInstance]:
    """A temporary on-disk Dagster instance: sensor and schedule ticks need its reference, as under the daemon."""
    with dagster.instance_for_test() as instance:
        yield instance


@pytest.fixture(params=["local", "s3"])
def lake_settings(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The test's settings with the lake in tmp_path, or in a fresh bucket of the session's S3 server."""
    if request.param == "local":
        yield settings
        return
    import boto3

    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.s3_access_key,
        aws_secret_access_key=settings.s3_secret_key,
        region_name=settings.s3_region,
    )
    s3.create_bucket(Bucket=bucket)
    yield settings.model_copy(update={"lake_uri": f"s3://{bucket}/lake"})
