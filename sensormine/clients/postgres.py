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


# The function roles a connection takes (migration 016 grants them; the launcher's
# bootstrap_roles creates them). A login holds no privilege of its own.
READER = "sensormine_reader"
WRITER = "sensormine_writer"
AUTH = "sensormine_auth"
INGEST = "sensormine_ingest"
METERING = "sensormine_metering"
LAKE = "sensormine_lake"
ALERTS = "sensormine_alerts"
FUNCTION_ROLES = frozenset({READER, WRITER, AUTH, INGEST, METERING, LAKE, ALERTS})


def connect(
    settings: Settings | None = None, autocommit: bool = False, *, role: str | None = None
) -> psycopg.Connection:
    """A new connection to the hot store, acting as the function `role` for its whole life.

    Without a role the connection can do nothing but take one per transaction (`tenant_scope`,
    `role_scope`): a forgotten scope is a permission error, never another tenant's rows.
    """
    if role is None:
        return psycopg.connect(database_url(settings), autocommit=autocommit)
    if role not in FUNCTION_ROLES:
        raise ValueError(f"unknown database role {role!r}")
    try:
        return psycopg.connect(database_url(settings), autocommit=autocommit, options=f"-c role={role}")
    except psycopg.OperationalError as exc:
        if "permission denied to set role" in str(exc):
            raise psycopg.OperationalError(
                f"{exc}: this process's database login is not a member of {role}; log in as a role that is "
                "(sensormine db bootstrap creates them; docs/decisions.md)"
            ) from None
        raise


def migration_connect(settings: Settings | None = None) -> psycopg.Connection:
    """A connection as the schema owner (`database_migrate_url`, else `database_url`) for `migrate`."""
    settings = settings or get_settings()
    return psycopg.connect(settings.database_migrate_url or database_url(settings))


def migrate_database(settings: Settings | None = None) -> list[str]:
    """Apply pending migrations as the schema owner; returns those applied."""
    with migration_connect(settings) as conn:
        try:
            return migrate(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise psycopg.errors.InsufficientPrivilege(
                f"{exc}: migrations run as the schema owner; set SENSORMINE_DATABASE_MIGRATE_URL to its login "
                "(the launcher's sensormine_owner; docs/decisions.md, 'No superuser at run time')"
            ) from None


@contextmanager
def role_scope(conn: psycopg.Connection, role: str) -> Iterator[psycopg.Connection]:
    """A transaction acting as the function `role` (e.g. AUTH for credential lookups).

    Nested in a caller's transaction it is a savepoint, and the caller's role is back afterwards
    (a released savepoint would otherwise keep the SET LOCAL to the end of the outer transaction).
    """
    if role not in FUNCTION_ROLES:
        raise ValueError(f"unknown database role {role!r}")
    nested = conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    before = conn.execute("SELECT current_user").fetchone()[0] if nested else None  # type: ignore[index]
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        yield conn
        if before is not None:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(before)))


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
    """Create the day partitions that are missing (inside the caller's transaction); returns those created.

    Through `sensormine_ensure_day_partitions` (migration 016), which runs as the schema owner: the
    writers may insert into the partitions, never create or alter tables themselves.
    """
    wanted = sorted(set(days))
    if not wanted:
        return []
    row = conn.execute("SELECT sensormine_ensure_day_partitions(%s::date[])", (wanted,)).fetchone()
    return sorted(row[0]) if row and row[0] else []


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
    with role_scope(conn, WRITER if write else READER):
        conn.execute(
            "SELECT set_config('sensormine.tenant_ids', %s, true), set_config('sensormine.platform', %s, true)",
            (ids, "on" if platform else "off"),
        )
        yield conn


def make_pool(settings: Settings | None = None, max_size: int = 8) -> ConnectionPool:
    """A pool of role-less connections (the API's): every use takes a scope (`tenant_scope`, `role_scope`)."""
    return ConnectionPool(database_url(settings), min_size=1, max_size=max_size, open=True)
