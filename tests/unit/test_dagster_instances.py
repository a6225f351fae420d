"""Why every Dagster instance a test opens is disposed in the thread that opened it.

An ephemeral instance holds one SQLite connection for its life, and Dagster's cached alembic config keeps a
reference to the last one. Left open, that connection is released wherever the reference next drops: in
another thread, SQLAlchemy's pool logs `sqlite3.ProgrammingError: SQLite objects created in a thread can
only be used in that same thread` (seen once in a fresh-clone run, during an API test whose client runs
the app in a worker thread). `tests/conftest.py` fails any test during which that error is logged.
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import logging, threading
logging.basicConfig()
import dagster as dg
{first}
worker = threading.Thread(target=lambda: dg.DagsterInstance.ephemeral().dispose())
worker.start()
worker.join()
"""


def run(first: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(first=first)], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stderr


def test_an_undisposed_ephemeral_instance_is_closed_from_another_thread() -> None:
    assert "can only be used in that same thread" in run("dg.DagsterInstance.ephemeral()")


def test_a_disposed_ephemeral_instance_leaves_nothing_for_another_thread() -> None:
    assert "same thread" not in run("with dg.DagsterInstance.ephemeral():\n    pass")
