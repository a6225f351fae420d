"""Helpers shared by benchmarks: a throw-away database, progress output, rates."""

from __future__ import annotations

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
    """A new, migrated database on the server of `base_url`, dropped on exit whatever happens."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin_url = database_url_for(base_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url_for(base_url, name)
    try:
        with psycopg.connect(url) as conn:
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
