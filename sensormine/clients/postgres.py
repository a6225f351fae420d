"""PostgreSQL client: connections, migrations, day partitions, and tenant-scoped sessions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from importlib import resources

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from sensormine.reading import EPOCH
from sensormine.settings import Settings, get_settings

MIGRATION_LOCK = 7_351_001
PARTITION_LOCK = 7_351_002
_PARTITION_RE = re.compile(r"^telemetry_p(\d{8})$")


class DatabaseNotConfigured(RuntimeError):
    """Raised when no database URL is set."""


def database_url(settings: Settings | None = None) -> str:
    """The configured database URL, or a clear error telling how to get one."""
    settings = settings or get_settings()
    if not settings.database_url:
        raise DatabaseNotConfigured(
            "SENSORMINE_DATABASE_URL is not set: run `sensormine services up` and eval the printed exports, "
            "or `make demo` which starts an embedded PostgreSQL."
        )
    return settings.database_url


def connect(settings: Settings | None = None, autocommit: bool = False) -> psycopg.Connection:
    """A new connection to the hot store."""
    return psycopg.connect(database_url(settings), autocommit=autocommit)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply pending SQL migrations in order (serialised by an advisory lock); returns those applied."""
    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        files = sorted(
            (f for f in resources.files("sensormine.migrations").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        for f in files:
            if f.name in done:
                continue
            conn.execute(f.read_text())  # type: ignore[arg-type]
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (f.name,))
            applied.append(f.name)
    return applied


def partition_name(day: date) -> str:
    """Name of the hot-store partition holding one UTC day."""
    return f"telemetry_p{day:%Y%m%d}"


def existing_partition_days(conn: psycopg.Connection) -> set[date]:
    """The UTC days that already have a hot-store partition."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'telemetry'::regclass"
    ).fetchall()
    days = set()
    for (name,) in rows:
        m = _PARTITION_RE.match(name)
        if m:
            days.add(date(int(m[1][:4]), int(m[1][4:6]), int(m[1][6:])))
    return days


def ensure_partitions(conn: psycopg.Connection, days: Iterable[date]) -> list[date]:
    """Create the day partitions that are missing (inside the caller's transaction); returns those created."""
    wanted = set(days)
    if not wanted:
        return []
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
    missing = sorted(wanted - existing_partition_days(conn))
    for day in missing:
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF telemetry FOR VALUES FROM ({}) TO ({})").format(
                sql.Identifier(partition_name(day)),
                sql.Literal(f"{day.isoformat()} 00:00:00+00"),
                sql.Literal(f"{(day + timedelta(days=1)).isoformat()} 00:00:00+00"),
            )
        )
    return missing


def ensure_partition_window(conn: psycopg.Connection, today: date, settings: Settings | None = None) -> list[date]:
    """Create partitions from `partition_days_back` before today to `partition_days_ahead` after it."""
    settings = settings or get_settings()
    days = [today + timedelta(days=d) for d in range(-settings.partition_days_back, settings.partition_days_ahead + 1)]
    with conn.transaction():
        return ensure_partitions(conn, days)


def epoch_day_to_date(day_number: int) -> date:
    """Calendar date of a day number counted from 1970-01-01."""
    return (EPOCH + timedelta(days=day_number)).date()


@contextmanager
def tenant_scope(
    conn: psycopg.Connection, tenant_ids: Iterable[str], *, write: bool = False, platform: bool = False
) -> Iterator[psycopg.Connection]:
    """A transaction in which row-level security shows only `tenant_ids`' rows.

    `write` runs it as the writer role (what API requests may change, under the same policies);
    `platform` lets a platform administrator's session see and create top-level tenants.
    """
    ids = ",".join(sorted(set(tenant_ids)))
    with conn.transaction():
        conn.execute("SET LOCAL ROLE sensormine_writer" if write else "SET LOCAL ROLE sensormine_reader")
        conn.execute(
            "SELECT set_config('sensormine.tenant_ids', %s, true), set_config('sensormine.platform', %s, true)",
            (ids, "on" if platform else "off"),
        )
        yield conn


def make_pool(settings: Settings | None = None, max_size: int = 8) -> ConnectionPool:
    """A connection pool for long-lived processes (API, daemons)."""
    return ConnectionPool(database_url(settings), min_size=1, max_size=max_size, open=True)
