"""`sensormine_in_snapshot` as shipped (migration 006, inlinable) against its first form (migration 002).

Run with `uv run python -m bench.snapshot [--rows 500000]` after `sensormine services up`. In a scratch
database it loads one tenant-day, takes a snapshot, adds rows after it, and counts the rows visible
in the snapshot with each form of the function (same answer checked), median of the trials.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from importlib import resources

import psycopg

from bench.common import say, scratch_database
from bench.compaction import load_day

QUERY = "SELECT count(*) FILTER (WHERE sensormine_in_snapshot(xmin, %s::pg_snapshot)), count(*) FROM telemetry"


def _function_sql(migration: str) -> str:
    text = resources.files("sensormine.migrations").joinpath(migration).read_text()
    body = text[text.index("CREATE ") :]
    return body.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _time(conn: psycopg.Connection, snapshot: str, trials: int) -> tuple[float, tuple[int, int]]:
    seconds, answer = [], (0, 0)
    for _ in range(trials):
        t0 = time.perf_counter()
        row = conn.execute(QUERY, (snapshot,)).fetchone()
        seconds.append(time.perf_counter() - t0)
        assert row is not None
        answer = (row[0], row[1])
    return statistics.median(seconds), answer


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, time both forms, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.snapshot", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows loaded before the snapshot")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    base = os.environ.get("SENSORMINE_DATABASE_URL")
    if not base:
        raise SystemExit("SENSORMINE_DATABASE_URL is not set: run `uv run sensormine services up` and source its env")
    with scratch_database(base, "bench_snapshot") as url:
        say(f"loading {args.rows:,} rows ...")
        load_day(url, args.rows, 50, 10)
        with psycopg.connect(url, autocommit=True) as conn:
            snapshot = conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # type: ignore[index]
            conn.execute(
                "INSERT INTO telemetry SELECT tenant_id, device_id, metric || '-late', ts, value, quality, ingest_ts "
                "FROM telemetry LIMIT 1000"
            )
            shipped, answer = _time(conn, snapshot, args.trials)
            conn.execute(_function_sql("002_compaction_snapshot.sql"))
            first, first_answer = _time(conn, snapshot, args.trials)
            if answer != first_answer:
                raise RuntimeError(f"the two forms disagree: {answer} vs {first_answer}")
    print(
        f"sensormine_in_snapshot over {answer[1]:,} rows ({answer[0]:,} visible in the snapshot), "
        f"median of {args.trials}\n"
        "measured: the hot-store visibility function over stored rows (no cache, no rollup)\n\n"
        f"{'form':<44}{'seconds':>9}\n{'-' * 53}\n"
        f"{'migration 002 (subquery: a call per row)':<44}{first:>9.3f}\n"
        f"{'migration 006 (one expression, inlined)':<44}{shipped:>9.3f}\n\n"
        f"speed-up: {first / shipped:.1f}x"
    )


if __name__ == "__main__":
    main()
