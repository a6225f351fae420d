"""Shared fixtures: real services from the launcher, a fresh database and Kafka namespace per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import dagster
import psycopg
import pytest

from sensormine.settings import Settings, reset_settings

if TYPE_CHECKING:
    from click.testing import Result

REPO = Path(__file__).resolve().parent.parent
SERVICE_VARS = (
    "SENSORMINE_DATABASE_URL",
    "SENSORMINE_DATABASE_MIGRATE_URL",
    "SENSORMINE_DATABASE_ADMIN_URL",
    "PGPASSFILE",
    "SENSORMINE_MQTT_URL",
    "SENSORMINE_KAFKA_BOOTSTRAP",
    "SENSORMINE_REDIS_URL",
    "SENSORMINE_S3_ENDPOINT",
    "SENSORMINE_SMTP_URL",
    "SENSORMINE_STRIPE_API_BASE",
)


class _CrossThreadSQLite(logging.Handler):
    """Records SQLAlchemy pool errors about a SQLite connection used outside the thread that made it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and "same thread" in str(error):
            self.seen.append(f"{record.getMessage()}: {error}")


_cross_thread_sqlite = _CrossThreadSQLite()
logging.getLogger("sqlalchemy.pool").addHandler(_cross_thread_sqlite)


@pytest.fixture(autouse=True)
def no_sqlite_connection_crosses_threads() -> Iterator[None]:
    """Fails the test during which SQLAlchemy closed a SQLite connection from a thread other than the one
    that opened it (an undisposed DagsterInstance.ephemeral(): open Dagster instances with `with`)."""
    before = len(_cross_thread_sqlite.seen)
    yield
    if len(_cross_thread_sqlite.seen) > before:
        pytest.fail(
            "a SQLite connection was closed from another thread: " + "; ".join(_cross_thread_sqlite.seen[before:])
        )


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """SENSORMINE_* URLs of running services: taken from the environment when all are set, else started."""
    if all(os.environ.get(v) for v in SERVICE_VARS):
        return {k: v for k, v in os.environ.items() if k.startswith("SENSORMINE_") or k == "PGPASSFILE"}
    from sensormine.services.launcher import up

    env = up(state_dir=Path(os.environ.get("SENSORMINE_STATE_DIR", REPO / ".sensormine")))
    os.environ.update(env)
    reset_settings()
    return env


def _in_db(url: str, dbname: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + dbname


def admin_url_of(settings: Settings) -> str:
    """The superuser's URL for the test database of `settings`: for a test's own set-up and checks only
    (the platform itself never connects as a superuser)."""
    return _in_db(os.environ["SENSORMINE_DATABASE_ADMIN_URL"], (settings.database_url or "").rsplit("/", 1)[1])


@contextmanager
def new_database(services: dict[str, str]) -> Iterator[str]:
    """A new database, owned and migrated by the schema owner, dropped afterwards; the URL of the tools'
    login (sensormine_app: no privilege of its own, every function role)."""
    from sensormine.clients.postgres import migrate

    admin, owner = services["SENSORMINE_DATABASE_ADMIN_URL"], services["SENSORMINE_DATABASE_MIGRATE_URL"]
    name = f"sm_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_in_db(admin, "postgres"), autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" OWNER sensormine_owner')
    with psycopg.connect(_in_db(admin, name), autocommit=True) as c:
        c.execute("GRANT CREATE, USAGE ON SCHEMA public TO sensormine_owner")
    with psycopg.connect(_in_db(owner, name)) as conn:
        migrate(conn)
    yield _in_db(services["SENSORMINE_DATABASE_URL"], name)
    with psycopg.connect(_in_db(admin, "postgres"), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(services: dict[str, str]) -> Iterator[str]:
    """A new database for one test (see `new_database`)."""
    with new_database(services) as url:
        yield url


def settings_for(services: dict[str, str], database_url: str, state_dir: Path) -> Settings:
    """Settings over one database with the lake and state in `state_dir` and a Kafka topic namespace of their own."""
    return Settings(
        env=(env := f"t{uuid.uuid4().hex[:8]}"),
        consumer_group=f"{env}-hot-writer",
        state_dir=state_dir,
        database_url=database_url,
        database_migrate_url=_in_db(services["SENSORMINE_DATABASE_MIGRATE_URL"], database_url.rsplit("/", 1)[1]),
        kafka_bootstrap=services.get("SENSORMINE_KAFKA_BOOTSTRAP"),
        mqtt_url=services.get("SENSORMINE_MQTT_URL"),
        redis_url=services.get("SENSORMINE_REDIS_URL"),
        s3_endpoint=services.get("SENSORMINE_S3_ENDPOINT"),
        s3_access_key=services.get("SENSORMINE_S3_ACCESS_KEY", "test"),
        s3_secret_key=services.get("SENSORMINE_S3_SECRET_KEY", "test"),
        smtp_url=services.get("SENSORMINE_SMTP_URL"),
        stripe_api_base=services.get("SENSORMINE_STRIPE_API_BASE"),
        stripe_api_key=services.get("SENSORMINE_STRIPE_API_KEY"),
        stripe_webhook_secret="whsec_test_" + uuid.uuid4().hex,
        lake_uri=str(state_dir / "lake"),
        mqtt_session_expiry_s=60,  # broker sessions of finished tests go away soon
        jwt_secret="test-signing-secret-" + uuid.uuid4().hex,
    )


@pytest.fixture
def settings(services: dict[str, str], database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own database, lake folder and Kafka topic namespace."""
    return settings_for(services, database_url, tmp_path)


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Result]]:
    """`sensormine ...` through the CLI, against the test's database and Kafka namespace."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("SENSORMINE_DATABASE_URL", settings.database_url or "")
    monkeypatch.setenv("SENSORMINE_DATABASE_MIGRATE_URL", settings.database_migrate_url or "")
    monkeypatch.setenv("SENSORMINE_KAFKA_BOOTSTRAP", settings.kafka_bootstrap or "")
    monkeypatch.setenv("SENSORMINE_ENV", settings.env)
    reset_settings()
    runner = CliRunner()
    yield lambda *args: runner.invoke(app, list(args))
    reset_settings()


@pytest.fixture
def admin_url(settings: Settings) -> str:
    """The superuser's URL of the test's database (set-up and checks of the test itself)."""
    return admin_url_of(settings)


@pytest.fixture
def conn(admin_url: str) -> Iterator[psycopg.Connection]:
    """A superuser connection to the test's database, for the test's own set-up and checks."""
    with psycopg.connect(admin_url) as c:
        yield c


@pytest.fixture
def dagster_instance() -> Iterator[dagster.DagsterInstance]:
    """A temporary on-disk Dagster instance: sensor and schedule ticks need its reference, as under the daemon."""
    with dagster.instance_for_test() as instance:
        yield instance


def in_new_bucket(settings: Settings) -> Settings:
    """`settings` with the lake in a fresh bucket of the session's S3 server."""
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
    return settings.model_copy(update={"lake_uri": f"s3://{bucket}/lake"})


@pytest.fixture(params=["local", "s3"])
def lake_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The test's settings with the lake in tmp_path, or in a fresh bucket of the session's S3 server."""
    return settings if request.param == "local" else in_new_bucket(settings)
