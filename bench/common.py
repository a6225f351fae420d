"""Helpers shared by benchmarks: a throw-away database, progress output, rates."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from sensormine.clients.postgres import migrate


def say(message: str) -> None:
    """Progress line on stderr, timestamped, flushed at once (benchmarks run for a while)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def database_url_for(base_url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    return base_url.rsplit("/", 1)[0] + "/" + dbname


@contextmanager
def scratch_database(base_url: str, prefix: str = "bench") -> Iterator[str]:
    """A new database on the server of `base_url`, owned and migrated by the schema owner, dropped on exit
    whatever happens.

    Yields the superuser's URL of it (SENSORMINE_DATABASE_ADMIN_URL's login): benchmarks set up data and
    read their ceilings with it, and the platform code under measurement takes the same function roles
    as in production (a superuser may SET ROLE to any of them), so the hot-store writer still COPYs
    into day partitions as the ingest role (docs/decisions.md, "No superuser at run time").
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin_base = os.environ.get("SENSORMINE_DATABASE_ADMIN_URL") or base_url
    owner_base = os.environ.get("SENSORMINE_DATABASE_MIGRATE_URL")
    admin_url = database_url_for(admin_base, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if owner_base:
            admin.execute(f'CREATE DATABASE "{name}" OWNER sensormine_owner')
        else:
            admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url_for(admin_base, name)
    try:
        if owner_base:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute("GRANT CREATE, USAGE ON SCHEMA public TO sensormine_owner")
        with psycopg.connect(database_url_for(owner_base or admin_base, name)) as conn:
            migrate(conn)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def checkpoint(url: str) -> None:
    """Flush dirty buffers now, so one timed phase does not pay for the previous phase's writes."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def rate(amount: float, seconds: float) -> float:
    """Amount per second (or any ratio), 0 when the divisor is 0."""
    return amount / seconds if seconds > 0 else 0.0


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (/proc/loadavg): benchmarks share the machine, say how busy it was."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"
