"""`sensormine sql` and `lake.catalog` over a real lake: hot-store rows compacted to Delta, local and on S3 (moto).

Tenants: acme has sub-tenants acme-east (which has acme-east-lab) and acme-west; globex is
unrelated. Every expected figure is computed in Python from the readings written to the hot store.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pyarrow.parquet as pq
import pytest
from click.testing import Result
from typer.testing import CliRunner

from cli.main import app
from lake.catalog import lake_tables, open_catalog
from lake.rollups import ROLLUP_1H, ROLLUP_1M, write_rollup
from lake.telemetry import TELEMETRY_SCHEMA, compact_day, read_telemetry
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.reading import Reading, us_to_datetime
from sensormine.settings import Settings, reset_settings
from sensormine.tenancy.tenants import visible_tenant_ids
from tests.conftest import admin_url_of, in_new_bucket, new_database, settings_for
from tests.factories import DAY, DAY_US, make_tenant, readings

pytestmark = pytest.mark.integration

FAMILY = {"acme": None, "acme-east": "acme", "acme-east-lab": "acme-east", "acme-west": "acme", "globex": None}
DAYS = (DAY.date(), DAY.date() + timedelta(days=1))
HALF_HOUR_US = 1_800_000_000
SCOPES = {
    "acme": {"acme", "acme-east", "acme-east-lab", "acme-west"},
    "acme-east": {"acme-east", "acme-east-lab"},
    "acme-west": {"acme-west"},
    "acme-east-lab": {"acme-east-lab"},
    "globex": {"globex"},
}


def lake_readings() -> list[Reading]:
    """Two days of half-hourly readings, two devices x two metrics per tenant, values unique per tenant."""
    out: list[Reading] = []
    for t, tenant in enumerate(FAMILY):
        for k, device in enumerate(("d1", "d2")):
            for r in readings(tenant, device, 96, start_us=DAY_US, step_us=HALF_HOUR_US):
                out.append(r._replace(value=r.value + 1000 * t + 100 * k, quality=r.ts % 3))
    return out


@pytest.fixture(scope="module", params=["local", "s3"])
def lake(
    request: pytest.FixtureRequest, services: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """The tenants in the registry, their readings in the hot store, compacted (and rolled up) into the lake.

    Built once per module for each kind of lake (local folder, S3 bucket), in a database of its own:
    every test here only reads it (a CLI session's temporary tables live in its own DuckDB).
    """
    with new_database(services) as url:
        settings = settings_for(services, url, tmp_path_factory.mktemp(f"sql-lake-{request.param}"))
        if request.param == "s3":
            settings = in_new_bucket(settings)
        with psycopg.connect(admin_url_of(settings)) as conn:
            for tenant, parent in FAMILY.items():
                make_tenant(conn, tenant, ["d1", "d2"], parent_id=parent)
            HotStoreWriter(conn).write(lake_readings())
            for tenant in FAMILY:
                for day in DAYS:
                    compact_day(conn, settings, tenant, day)
                    write_rollup(settings, ROLLUP_1M, tenant, day)
                    write_rollup(settings, ROLLUP_1H, tenant, day)
            conn.commit()
        yield settings


@pytest.fixture
def lake_conn(lake: Settings) -> Iterator[psycopg.Connection]:
    """A superuser connection to the lake's database, for the test's own checks."""
    with psycopg.connect(admin_url_of(lake)) as c:
        yield c


def hourly(rows: list[Reading], tenant: str, device: str, metric: str) -> list[tuple]:
    """(hour, avg, min, max, count) of one series, computed in Python."""
    groups: dict[datetime, list[float]] = defaultdict(list)
    for r in rows:
        if (r.tenant_id, r.device_id, r.metric) == (tenant, device, metric):
            groups[us_to_datetime(r.ts).replace(minute=0, second=0, microsecond=0)].append(r.value)
    return [(h, sum(v) / len(v), min(v), max(v), len(v)) for h, v in sorted(groups.items())]


HOURLY_SQL = """
    SELECT date_trunc('hour', ts) AS hour, avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS n
    FROM telemetry
    WHERE tenant_id = '{tenant}' AND device_id = 'd2' AND metric = 'pressure'
      AND date BETWEEN DATE '{first}' AND DATE '{last}'
    GROUP BY hour ORDER BY hour"""


def test_catalog_reads_the_compacted_lake(lake: Settings) -> None:
    assert lake_tables(lake) == ["telemetry", "telemetry_1h", "telemetry_1m"]
    local = not lake.lake_root.startswith("s3://")
    with open_catalog(lake) as catalog:
        assert {v.reader for v in catalog.views.values()} == {"duckdb" if local else "pyarrow"}
        assert catalog.views["telemetry"].rows == len(lake_readings())
        # Every row, exactly as the lake's own reader returns it.
        got = catalog.sql(
            "SELECT tenant_id, device_id, metric, ts, value, quality, ingest_ts FROM telemetry "
            "ORDER BY tenant_id, device_id, metric, ts"
        )
        assert got.cast(read_telemetry(lake, list(FAMILY)).schema).equals(read_telemetry(lake, list(FAMILY)))
        assert catalog.sql("SELECT * FROM telemetry LIMIT 0").schema.names == TELEMETRY_SCHEMA.names

        # The hourly aggregate over both days against Python's.
        query = HOURLY_SQL.format(tenant="acme-west", first=DAYS[0], last=DAYS[1])
        got_rows = [tuple(r.values()) for r in catalog.sql(query).to_pylist()]
        expected = hourly(lake_readings(), "acme-west", "d2", "pressure")
        assert len(got_rows) == 48
        for g, e in zip(got_rows, expected, strict=True):
            assert g[0] == e[0] and g[1] == pytest.approx(e[1]) and g[2:] == e[2:]

        # The rollup table agrees with the raw rows it was computed from.
        mismatches = catalog.sql(
            """
            SELECT count(*) AS n FROM telemetry_1h r FULL JOIN (
                SELECT tenant_id, device_id, metric, date_trunc('hour', ts) AS bucket,
                       count(*) AS count, min(value) AS min, max(value) AS max
                FROM telemetry GROUP BY ALL) t USING (tenant_id, device_id, metric, bucket)
            WHERE r.count IS DISTINCT FROM t.count OR r.min IS DISTINCT FROM t.min OR r.max IS DISTINCT FROM t.max
            """
        )
        assert mismatches.column("n").to_pylist() == [0]
        assert catalog.sql("SELECT count(*) AS n FROM telemetry_1h").column("n").to_pylist() == [5 * 2 * 2 * 48]


def test_tenant_sessions_see_themselves_and_their_sub_tenants_only(
    lake_conn: psycopg.Connection, lake: Settings
) -> None:
    rows = lake_readings()
    for tenant, scope in SCOPES.items():
        visible = visible_tenant_ids(lake_conn, tenant)
        assert set(visible) == scope
        with open_catalog(lake, visible) as catalog:
            for table in ("telemetry", "telemetry_1m", "telemetry_1h"):
                seen = catalog.sql(f"SELECT DISTINCT tenant_id FROM {table}").column("tenant_id").to_pylist()
                assert set(seen) == scope, (tenant, table)
            count = catalog.sql("SELECT count(*) AS n FROM telemetry").column("n").to_pylist()[0]
            assert count == sum(1 for r in rows if r.tenant_id in scope)
            # Naming another tenant does not help.
            outside = sorted(set(FAMILY) - scope)
            listed = ", ".join(f"'{t}'" for t in outside)
            n = catalog.sql(f"SELECT count(*) AS n FROM telemetry WHERE tenant_id IN ({listed})")
            assert n.column("n").to_pylist() == [0]


@pytest.fixture
def cli(lake: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Result]]:
    """Runs `sensormine ...` in-process with the environment pointing at the test's database and lake."""
    env = {
        "SENSORMINE_DATABASE_URL": lake.database_url or "",
        "SENSORMINE_DATABASE_MIGRATE_URL": lake.database_migrate_url or "",
        "SENSORMINE_LAKE_URI": lake.lake_root,
        "SENSORMINE_S3_ENDPOINT": lake.s3_endpoint or "",
        "SENSORMINE_S3_ACCESS_KEY": lake.s3_access_key or "",
        "SENSORMINE_S3_SECRET_KEY": lake.s3_secret_key or "",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings()
    runner = CliRunner()
    yield lambda *args, **kw: runner.invoke(app, ["sql", *args], **kw)
    reset_settings()


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def table_cells(text: str) -> list[list[str]]:
    """The cells of a table-format result: rows between the box lines, header first (type line dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines]
    return [cells[0], *cells[2:]]


def test_cli_command_csv_for_a_tenant(cli: Callable[..., Result]) -> None:
    query = HOURLY_SQL.format(tenant="acme-east-lab", first=DAYS[1], last=DAYS[1])
    result = cli("--tenant", "acme-east", "-c", query, "--format", "csv")
    assert result.exit_code == 0, result.output
    got = parse_csv(result.stdout)
    expected = [e for e in hourly(lake_readings(), "acme-east-lab", "d2", "pressure") if e[0].date() == DAYS[1]]
    assert len(got) == 24
    for g, e in zip(got, expected, strict=True):
        assert datetime.fromisoformat(g["hour"]) == e[0]
        assert float(g["avg"]) == pytest.approx(e[1])
        assert (float(g["min"]), float(g["max"]), int(g["n"])) == e[2:]

    # The parent's rows are out of a sub-tenant's reach.
    parent = cli("--tenant", "acme-east", "-c", "SELECT count(*) AS n FROM telemetry WHERE tenant_id = 'acme'")
    assert parent.exit_code == 0 and table_cells(parent.stdout) == [["n"], ["0"]]


def test_cli_file_table_and_parquet_output(cli: Callable[..., Result], tmp_path) -> None:
    script = tmp_path / "q.sql"
    script.write_text(
        "-- devices per tenant\n"
        "CREATE TEMP TABLE per_tenant AS SELECT tenant_id, count(DISTINCT device_id) AS devices, count(*) AS n\n"
        "  FROM telemetry GROUP BY tenant_id;\n"
        "SELECT * FROM per_tenant ORDER BY tenant_id;\n"
    )
    table = cli("--tenant", "acme", "-f", str(script))
    assert table.exit_code == 0, table.output
    per_tenant = 2 * 2 * 96
    for tenant in SCOPES["acme"]:
        assert f"│ {tenant}" in table.stdout and f"{per_tenant} │" in table.stdout
    assert "globex" not in table.stdout and "(4 rows)" in table.stdout

    out = tmp_path / "west.parquet"
    west = "SELECT * FROM telemetry WHERE tenant_id = 'acme-west'"
    written = cli("--tenant", "acme", "-c", west, "--format", "parquet", "-o", str(out))
    assert written.exit_code == 0, written.output
    got = pq.read_table(out).sort_by([("device_id", "ascending"), ("metric", "ascending"), ("ts", "ascending")])
    expected = sorted(
        (r for r in lake_readings() if r.tenant_id == "acme-west"), key=lambda r: (r.device_id, r.metric, r.ts)
    )
    assert got.column("value").to_pylist() == [r.value for r in expected]
    assert got.column("ts").to_pylist() == [us_to_datetime(r.ts) for r in expected]
    assert got.schema.names == TELEMETRY_SCHEMA.names


def test_cli_errors_are_messages_not_tracebacks(cli: Callable[..., Result], lake: Settings) -> None:
    cases = [
        (("-c", "SELEC 1"), "Parser Error"),
        (("-c", "SELECT nope FROM telemetry"), "nope"),
        (("--tenant", "nobody", "-c", "SELECT 1"), "tenant 'nobody' does not exist"),
        (("-c", "SELECT 1", "--format", "parquet"), "--output"),
        (("-c", "SELECT 1", "--format", "xml"), "--format must be one of"),
        (("-c", "SELECT 1", "-f", "x.sql"), "either -c or -f"),
        (("-f", "/nonexistent/q.sql"), "No such file"),
        # A tenant session cannot read the lake's files by itself.
        (
            ("--tenant", "acme", "-c", f"SELECT * FROM read_parquet('{lake.lake_root}/telemetry/*/*/*.parquet')"),
            "Error",
        ),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_shell(cli: Callable[..., Result]) -> None:
    session = cli(
        "--tenant",
        "globex",
        input=".tables\nSELECT tenant_id,\n  count(*) AS n FROM telemetry GROUP BY ALL;\nSELECT broken;\n.quit\n",
    )
    assert session.exit_code == 1  # piped input with a failed statement
    assert "telemetry_1m" in session.stdout and "│ globex" in session.stdout and "384" in session.stdout
    assert "acme" not in session.stdout and "broken" in session.stderr


def test_real_cli_process(lake: Settings) -> None:
    env = {
        **os.environ,
        "SENSORMINE_DATABASE_URL": lake.database_url or "",
        "SENSORMINE_DATABASE_MIGRATE_URL": lake.database_migrate_url or "",
        "SENSORMINE_LAKE_URI": lake.lake_root,
        "SENSORMINE_S3_ENDPOINT": lake.s3_endpoint or "",
        "SENSORMINE_S3_ACCESS_KEY": lake.s3_access_key or "",
        "SENSORMINE_S3_SECRET_KEY": lake.s3_secret_key or "",
    }
    query = "SELECT tenant_id, count(*) AS n, max(ts) AS last FROM telemetry GROUP BY ALL ORDER BY ALL"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "sql", "--tenant", "acme-east", "-c", query, "--format", "csv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    last = datetime.fromtimestamp((DAY_US + 95 * HALF_HOUR_US) / 1e6, UTC)
    assert [(r["tenant_id"], int(r["n"]), datetime.fromisoformat(r["last"])) for r in parse_csv(done.stdout)] == [
        ("acme-east", 384, last),
        ("acme-east-lab", 384, last),
    ]
    failed = subprocess.run(
        [sys.executable, "-m", "cli", "sql", "-c", "SELECT * FROM nowhere"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error: Catalog Error: Table with name nowhere does not exist")
