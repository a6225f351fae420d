"""SQL over the lake without services: `lake.catalog` and `lake.sqlshell` on Delta tables in a temp folder.

The tables are written with write_deltalake in the lake's real layout (partitioned by tenant_id,
date); expected results are computed in plain Python from the rows that were written.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from lake.catalog import LakeCatalog, SnapshotFiles, lake_tables, open_catalog, paths_encode_partitions
from lake.rollups import ROLLUP_SCHEMA
from lake.sqlshell import SqlError, run_script, run_shell
from lake.storage import LakeError
from lake.telemetry import TELEMETRY_SCHEMA
from sensormine.settings import Settings

DAY0 = date(2026, 3, 1)
TENANTS = ("acme", "acme-east", "globex")
DEVICES = ("d1", "d2")
METRICS = ("temperature", "pressure")
STEP = timedelta(minutes=20)  # 72 readings per series per day


def reading_rows(tenants: tuple[str, ...] = TENANTS, days: int = 3) -> list[dict]:
    """Deterministic telemetry rows: every series of every tenant, every 20 minutes, for `days` days."""
    rows = []
    for t, tenant in enumerate(tenants):
        for d in range(days):
            start = datetime.combine(DAY0 + timedelta(days=d), datetime.min.time(), tzinfo=UTC)
            for k, device in enumerate(DEVICES):
                for m, metric in enumerate(METRICS):
                    for i in range(72):
                        ts = start + i * STEP
                        rows.append(
                            {
                                "tenant_id": tenant,
                                "device_id": device,
                                "metric": metric,
                                "ts": ts,
                                "value": 1000.0 * t + 100 * k + 10 * m + (i % 7) + d / 4,
                                "quality": i % 3,
                                "ingest_ts": ts + timedelta(seconds=5),
                                "date": ts.date(),
                            }
                        )
    return rows


def write_table(settings: Settings, name: str, table: pa.Table, partition_by: list[str] | None = None) -> None:
    """Append to a lake table, one commit per call, in the lake's layout."""
    write_deltalake(
        f"{settings.lake_root}/{name}",
        table,
        mode="append",
        partition_by=["tenant_id", "date"] if partition_by is None else partition_by,
    )


@pytest.fixture
def lake(tmp_path: Path) -> Settings:
    """A local lake with telemetry (two commits), an hourly rollup, and things that are not lake tables."""
    settings = Settings(state_dir=tmp_path, lake_uri=str(tmp_path / "lake"), database_url=None)
    rows = reading_rows()
    first = [r for r in rows if r["date"] < DAY0 + timedelta(days=2)]
    rest = [r for r in rows if r["date"] >= DAY0 + timedelta(days=2)]
    write_table(settings, "telemetry", pa.Table.from_pylist(first, schema=TELEMETRY_SCHEMA))
    write_table(settings, "telemetry", pa.Table.from_pylist(rest, schema=TELEMETRY_SCHEMA))
    write_table(settings, "telemetry_1h", pa.Table.from_pylist(hourly(rows), schema=ROLLUP_SCHEMA))
    (tmp_path / "lake" / "notes").mkdir()  # a folder without a _delta_log
    (tmp_path / "lake" / "readme.txt").write_text("not a table")
    write_table(settings, "_scratch", pa.table({"tenant_id": ["acme"], "date": [DAY0], "x": [1]}))  # hidden name
    return settings


def hourly(rows: list[dict]) -> list[dict]:
    """Rollup rows computed in Python: count/min/max/sum/avg/first/last per series and hour."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        bucket = r["ts"].replace(minute=0, second=0, microsecond=0)
        groups[(r["tenant_id"], r["device_id"], r["metric"], bucket)].append(r)
    out = []
    for (tenant, device, metric, bucket), members in sorted(groups.items()):
        members.sort(key=lambda r: r["ts"])
        values = [r["value"] for r in members]
        out.append(
            {
                "tenant_id": tenant,
                "device_id": device,
                "metric": metric,
                "bucket": bucket,
                "count": len(values),
                "min": min(values),
                "max": max(values),
                "sum": sum(values),
                "avg": sum(values) / len(values),
                "first": values[0],
                "last": values[-1],
                "date": bucket.date(),
            }
        )
    return out


def rows_of(catalog: LakeCatalog, query: str) -> list[tuple]:
    return [tuple(r.values()) for r in catalog.sql(query).to_pylist()]


def test_every_delta_table_under_the_root_is_a_view(lake: Settings) -> None:
    assert lake_tables(lake) == ["telemetry", "telemetry_1h"]
    with open_catalog(lake) as catalog:
        assert set(catalog.views) == {"telemetry", "telemetry_1h"}
        telemetry = catalog.views["telemetry"]
        assert (telemetry.version, telemetry.files, telemetry.rows) == (1, 9, len(reading_rows()))
        assert telemetry.reader == "duckdb"
        assert telemetry.partition_columns == ("tenant_id", "date")
        assert list(catalog.sql("SELECT * FROM telemetry LIMIT 0").schema.names) == TELEMETRY_SCHEMA.names
        shown = {r[0] for r in rows_of(catalog, "SELECT table_name FROM duckdb_tables() UNION ALL SHOW TABLES")}
        assert {"telemetry", "telemetry_1h"} <= shown


def test_an_empty_or_missing_lake_has_no_views(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, lake_uri=str(tmp_path / "nowhere"))
    assert lake_tables(settings) == []
    with open_catalog(settings) as catalog:
        assert catalog.views == {}
        with pytest.raises(duckdb.CatalogException):
            catalog.sql("SELECT * FROM telemetry")


@pytest.mark.parametrize("reader", ["duckdb", "pyarrow"])
def test_both_readers_return_exactly_the_written_rows(lake: Settings, reader: str) -> None:
    written = pa.Table.from_pylist(reading_rows(), schema=TELEMETRY_SCHEMA)
    order = [(c, "ascending") for c in ("tenant_id", "device_id", "metric", "ts")]
    with open_catalog(lake, reader=reader) as catalog:  # type: ignore[arg-type]
        assert catalog.views["telemetry"].reader == reader
        got = catalog.sql("SELECT * FROM telemetry ORDER BY tenant_id, device_id, metric, ts")
        assert got.cast(TELEMETRY_SCHEMA).equals(written.sort_by(order))
        rollups = catalog.sql("SELECT * FROM telemetry_1h ORDER BY tenant_id, device_id, metric, bucket")
        assert rollups.cast(ROLLUP_SCHEMA).equals(pa.Table.from_pylist(hourly(reading_rows()), schema=ROLLUP_SCHEMA))


@pytest.mark.parametrize("reader", ["duckdb", "pyarrow"])
def test_hourly_aggregate_matches_python(lake: Settings, reader: str) -> None:
    expected = [
        (h["bucket"], h["avg"], h["min"], h["max"], h["count"])
        for h in hourly(reading_rows())
        if (h["tenant_id"], h["device_id"], h["metric"]) == ("acme", "d2", "pressure")
        and datetime(2026, 3, 1, 12, tzinfo=UTC) <= h["bucket"] < datetime(2026, 3, 3, 6, tzinfo=UTC)
    ]
    query = """
        SELECT date_trunc('hour', ts) AS hour, avg(value), min(value), max(value), count(*)
        FROM telemetry
        WHERE tenant_id = 'acme' AND device_id = 'd2' AND metric = 'pressure'
          AND ts >= TIMESTAMPTZ '2026-03-01 12:00:00+00' AND ts < TIMESTAMPTZ '2026-03-03 06:00:00+00'
        GROUP BY hour ORDER BY hour"""
    with open_catalog(lake, reader=reader) as catalog:  # type: ignore[arg-type]
        got = rows_of(catalog, query)
    assert len(got) == 42
    assert [g[0] for g in got] == [e[0] for e in expected]  # UTC hours, whatever the machine's zone
    for g, e in zip(got, expected, strict=True):
        assert g[1] == pytest.approx(e[1]) and g[2:] == e[2:]


@pytest.mark.parametrize("reader", ["duckdb", "pyarrow"])
def test_restricted_session_sees_only_its_tenants(lake: Settings, reader: str) -> None:
    with open_catalog(lake, ["acme-east", "acme"], reader=reader) as catalog:  # type: ignore[arg-type]
        assert catalog.tenant_ids == ("acme", "acme-east")
        for table in ("telemetry", "telemetry_1h"):
            counts = dict(rows_of(catalog, f"SELECT tenant_id, count(*) FROM {table} GROUP BY 1"))
            assert set(counts) == {"acme", "acme-east"}
        # Asking for the other tenant explicitly gives nothing.
        assert rows_of(catalog, "SELECT count(*) FROM telemetry WHERE tenant_id = 'globex'") == [(0,)]
        assert catalog.views["telemetry"].files == 6
        assert catalog.views["telemetry"].rows == 2 * 3 * len(DEVICES) * len(METRICS) * 72


def test_restricted_session_cannot_go_around_the_views(lake: Settings) -> None:
    globex_files = [f for f in DeltaTable(f"{lake.lake_root}/telemetry").file_uris() if "tenant_id=globex" in f]
    own_file = next(f for f in DeltaTable(f"{lake.lake_root}/telemetry").file_uris() if "tenant_id=acme/" in f)
    with open_catalog(lake, ["acme"]) as catalog:
        for attempt in (
            f"SELECT * FROM read_parquet('{globex_files[0]}')",
            f"SELECT * FROM read_parquet('{lake.lake_root}/telemetry/**/*.parquet')",
            f"SELECT * FROM glob('{lake.lake_root}/*')",
            f"ATTACH '{lake.lake_root}/x.duckdb'",
            f"COPY (SELECT 1) TO '{lake.lake_root}/leak.csv'",
            "INSTALL httpfs",
        ):
            with pytest.raises(duckdb.PermissionException):
                catalog.conn.execute(attempt)
        for undo in ("SET enable_external_access = true", "RESET allowed_paths", "SET allowed_directories = ['/']"):
            with pytest.raises(duckdb.InvalidInputException, match="locked"):
                catalog.conn.execute(undo)
        # Its own files stay readable: they hold nothing but its rows.
        assert rows_of(catalog, f"SELECT DISTINCT date FROM read_parquet('{own_file}')") != []
    assert not (Path(lake.lake_root) / "leak.csv").exists()


def test_an_empty_tenant_list_sees_no_rows(lake: Settings) -> None:
    with open_catalog(lake, []) as catalog:
        assert rows_of(catalog, "SELECT count(*) FROM telemetry") == [(0,)]
        assert rows_of(catalog, "SELECT count(*) FROM telemetry_1h") == [(0,)]


def test_bad_tenant_ids_are_refused(lake: Settings) -> None:
    with pytest.raises(LakeError):
        open_catalog(lake, ["acme' OR true --"])


def test_tables_without_tenant_partitions(lake: Settings) -> None:
    # Reference data without tenant_id, and a table holding tenant_id but not partitioned by it.
    write_table(lake, "units", pa.table({"metric": ["temperature"], "unit": ["degC"]}), partition_by=[])
    mixed = pa.table({"tenant_id": ["acme", "globex", "acme"], "n": [1, 2, 3]})
    write_table(lake, "mixed", mixed, partition_by=[])
    with open_catalog(lake) as catalog:
        assert rows_of(catalog, "SELECT * FROM units") == [("temperature", "degC")]
        assert rows_of(catalog, "SELECT sum(n) FROM mixed") == [(6,)]
        assert catalog.views["mixed"].reader == "duckdb"
    with open_catalog(lake, ["acme"]) as catalog:
        assert "units" not in catalog.views  # not tenant data: hidden from a tenant
        # Its files hold other tenants' rows: read through the filtered dataset, never opened by DuckDB.
        assert catalog.views["mixed"].reader == "pyarrow"
        assert rows_of(catalog, "SELECT tenant_id, n FROM mixed ORDER BY n") == [("acme", 1), ("acme", 3)]
        mixed_file = DeltaTable(f"{lake.lake_root}/mixed").file_uris()[0]
        with pytest.raises(duckdb.PermissionException):
            catalog.conn.execute(f"SELECT * FROM read_parquet('{mixed_file}')")


def test_added_columns_read_as_null_in_older_files(lake: Settings) -> None:
    uri = f"{lake.lake_root}/events"
    write_deltalake(
        uri, pa.table({"tenant_id": ["acme"], "date": [DAY0], "a": [1]}), partition_by=["tenant_id", "date"]
    )
    later = pa.table({"tenant_id": ["acme"], "date": [DAY0], "a": [2], "b": ["new"]})
    write_deltalake(uri, later, mode="append", schema_mode="merge")
    for reader in ("duckdb", "pyarrow"):
        with open_catalog(lake, reader=reader) as catalog:  # type: ignore[arg-type]
            assert rows_of(catalog, "SELECT a, b FROM events ORDER BY a") == [(1, None), (2, "new")]


def test_views_are_pinned_to_the_version_seen_at_open(lake: Settings) -> None:
    with open_catalog(lake) as catalog:
        before = rows_of(catalog, "SELECT count(*) FROM telemetry")
        extra = [dict(r, date=DAY0 + timedelta(days=9), ts=r["ts"] + timedelta(days=9)) for r in reading_rows()[:5]]
        write_table(lake, "telemetry", pa.Table.from_pylist(extra, schema=TELEMETRY_SCHEMA))
        assert rows_of(catalog, "SELECT count(*) FROM telemetry") == before
    with open_catalog(lake) as catalog:
        assert rows_of(catalog, "SELECT count(*) FROM telemetry") == [(before[0][0] + 5,)]


def test_filters_on_partitions_prune_files(lake: Settings) -> None:
    query = "EXPLAIN SELECT avg(value) FROM telemetry WHERE tenant_id = 'acme' AND date = DATE '2026-03-02'"
    with open_catalog(lake) as catalog:
        plan = "".join(r["explain_value"] for r in catalog.sql(query).to_pylist())
        assert "Scanning Files: 1/9" in plan
    with open_catalog(lake, reader="pyarrow") as catalog:
        plan = "".join(r["explain_value"] for r in catalog.sql(query).to_pylist())
        # Pushed into the Arrow scanner, which skips fragments whose partition values cannot match.
        assert "PYTHON_ARROW_SCAN" in plan and "\"date\" = DATE '2026-03-02'" in plan


def test_partition_paths_must_match_the_log() -> None:
    def files(path: str, tenant: str) -> SnapshotFiles:
        return SnapshotFiles([path], {"tenant_id": [tenant], "date": [DAY0]}, [1], frozenset())

    assert paths_encode_partitions(
        files("tenant_id=acme/date=2026-03-01/part-0.parquet", "acme"), ["tenant_id", "date"]
    )
    for path, tenant in [
        ("tenant_id=acme/date=2026-03-02/part-0.parquet", "acme"),  # another day in the path
        ("tenant_id=globex/date=2026-03-01/part-0.parquet", "acme"),  # another tenant
        ("a1/b2/part-0.parquet", "acme"),  # not hive-style
        ("tenant_id=a%2Fb/date=2026-03-01/part-0.parquet", "a/b"),  # an escaped value
        ("/abs/tenant_id=acme/date=2026-03-01/part-0.parquet", "acme"),  # an absolute path
    ]:
        assert not paths_encode_partitions(files(path, tenant), ["tenant_id", "date"]), path


def test_snapshot_files_from_add_actions(lake: Settings) -> None:
    actions = pa.RecordBatchReader.from_stream(
        DeltaTable(f"{lake.lake_root}/telemetry").get_add_actions(flatten=True)
    ).read_all()
    everything = SnapshotFiles.from_actions(actions, ["tenant_id", "date"])
    assert len(everything.paths) == 9 and everything.rows == len(reading_rows())
    assert everything.columns_with_stats == {"device_id", "metric", "ts", "value", "quality", "ingest_ts"}
    globex = SnapshotFiles.from_actions(actions, ["tenant_id", "date"], ["globex"])
    assert set(globex.partition_values["tenant_id"]) == {"globex"} and len(globex.paths) == 3
    assert all(p.startswith("tenant_id=globex/") for p in globex.paths)
    assert globex.rows == len(reading_rows()) // 3


# --- lake.sqlshell ------------------------------------------------------------------------------


def test_script_in_table_format_shows_every_result(lake: Settings) -> None:
    out = io.StringIO()
    with open_catalog(lake, ["acme"]) as catalog:
        run_script(
            catalog,
            "CREATE TEMP TABLE d AS SELECT DISTINCT device_id FROM telemetry; "
            "SELECT count(*) AS devices FROM d; SELECT 'x;y' AS semicolon_in_string",
            out=out,
        )
    text = out.getvalue()
    assert "devices" in text and "│       2 │" in text
    assert "x;y" in text and text.count("(1 row)") == 2


def test_table_format_caps_rows_shown(lake: Settings) -> None:
    out = io.StringIO()
    with open_catalog(lake) as catalog:
        assert run_script(catalog, "SELECT * FROM range(2500) t(i)", out=out, max_rows=10) == 2500
    assert "(2500 rows, first 10 shown" in out.getvalue()
    assert re.search(r"│\s+9 │", out.getvalue()) and not re.search(r"│\s+10 │", out.getvalue())


def test_csv_output_is_the_last_result(lake: Settings) -> None:
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with open_catalog(lake, ["globex"]) as catalog:
        run_script(
            catalog,
            "SET VARIABLE day = DATE '2026-03-03'; SELECT 1;"
            "SELECT device_id, metric, count(*) AS n, sum(value) AS total FROM telemetry "
            "WHERE date = getvariable('day') GROUP BY ALL ORDER BY ALL",
            fmt="csv",
            out=out,
        )
    out.flush()
    parsed = list(csv.DictReader(io.StringIO(out.buffer.getvalue().decode())))  # type: ignore[attr-defined]
    expected: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in reading_rows():
        if r["tenant_id"] == "globex" and r["date"] == date(2026, 3, 3):
            expected[(r["device_id"], r["metric"])].append(r["value"])
    assert [(p["device_id"], p["metric"], int(p["n"])) for p in parsed] == [
        (d, m, len(v)) for (d, m), v in sorted(expected.items())
    ]
    for p in parsed:
        assert float(p["total"]) == pytest.approx(sum(expected[(p["device_id"], p["metric"])]))


def test_csv_and_parquet_files(lake: Settings, tmp_path: Path) -> None:
    query = "SELECT * FROM telemetry WHERE tenant_id = 'acme-east' ORDER BY device_id, metric, ts"
    expected = [r for r in reading_rows() if r["tenant_id"] == "acme-east"]
    expected.sort(key=lambda r: (r["device_id"], r["metric"], r["ts"]))
    with open_catalog(lake) as catalog:
        assert run_script(catalog, query, fmt="parquet", output=tmp_path / "out.parquet") == len(expected)
        assert run_script(catalog, query, fmt="csv", output=tmp_path / "out.csv") == len(expected)
        assert run_script(catalog, "SELECT 1 AS a WHERE false", fmt="csv", output=tmp_path / "empty.csv") == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.cast(TELEMETRY_SCHEMA).equals(pa.Table.from_pylist(expected, schema=TELEMETRY_SCHEMA))
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == ",".join(f'"{c}"' for c in TELEMETRY_SCHEMA.names)
    assert len(lines) == len(expected) + 1
    first = next(csv.DictReader(io.StringIO("\n".join(lines[:2]))))
    assert (first["device_id"], float(first["value"])) == ("d1", expected[0]["value"])
    assert (tmp_path / "empty.csv").read_text() == '"a"\n'


def test_script_errors(lake: Settings) -> None:
    with open_catalog(lake) as catalog:
        with pytest.raises(SqlError, match="Parser Error"):
            run_script(catalog, "SELEC 1", out=io.StringIO())
        with pytest.raises(SqlError, match="nope"):
            run_script(catalog, "SELECT nope FROM telemetry", out=io.StringIO())
        with pytest.raises(SqlError, match="no rows"):
            run_script(catalog, "SELECT 1; CREATE TEMP TABLE x AS SELECT 1", fmt="csv", out=io.StringIO())
        with pytest.raises(SqlError, match="--output"):
            run_script(catalog, "SELECT 1", fmt="parquet")
        with pytest.raises(SqlError, match="no SQL"):
            run_script(catalog, "  -- nothing\n", out=io.StringIO())
        # Statements before the failing one ran; the session stays usable.
        with pytest.raises(SqlError):
            run_script(catalog, "CREATE TEMP TABLE ok AS SELECT 42 AS v; SELECT 1/'x'", out=io.StringIO())
        assert rows_of(catalog, "SELECT v FROM ok") == [(42,)]


def test_shell_reads_statements_and_dot_commands(lake: Settings) -> None:
    script = (
        ".tables\n"
        "SELECT tenant_id, count(*) AS n\n"
        "  FROM telemetry\n"
        "  GROUP BY ALL ORDER BY ALL;\n"
        ".schema telemetry_1h\n"
        "SELECT nope;\n"
        ".nonsense\n"
        "SELECT 'still alive' AS status;\n"
        ".quit\n"
        "SELECT 'after quit';\n"
    )
    out, err = io.StringIO(), io.StringIO()
    opened: list[LakeCatalog] = []

    def factory() -> LakeCatalog:
        opened.append(open_catalog(lake, ["acme", "acme-east"]))
        return opened[-1]

    code = run_shell(factory, stdin=io.StringIO(script), out=out, err=err)
    text = out.getvalue()
    assert code == 1  # piped input with failed statements
    assert re.search(r"│ telemetry_1h │ duckdb\s+│\s+0 │\s+6 │", text)  # .tables: 2 tenants x 3 days
    per_tenant = 3 * len(DEVICES) * len(METRICS) * 72
    assert re.search(rf"│ acme\s+│\s+{per_tenant} │", text) and re.search(rf"│ acme-east │\s+{per_tenant} │", text)
    assert "globex" not in text
    assert "bucket" in text and "TIMESTAMP WITH TIME ZONE" in text
    assert "still alive" in text and "after quit" not in text
    assert err.getvalue().count("error: ") == 2 and "nope" in err.getvalue() and ".nonsense" in err.getvalue()
    assert len(opened) == 1
    with pytest.raises(duckdb.ConnectionException):
        opened[0].conn.execute("SELECT 1")  # closed on the way out


def test_shell_refresh_and_csv(lake: Settings) -> None:
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    query = "SELECT count(*) AS n FROM telemetry WHERE date = DATE '2026-03-20'"
    script = f"{query};\n.refresh\n{query}"  # the last statement ends with the input, without ';'
    calls = 0

    def factory() -> LakeCatalog:
        nonlocal calls
        calls += 1
        if calls == 2:  # new data lands between opening the shell and .refresh
            extra = [dict(r, date=date(2026, 3, 20), ts=r["ts"].replace(day=20)) for r in reading_rows()[:4]]
            write_table(lake, "telemetry", pa.Table.from_pylist(extra, schema=TELEMETRY_SCHEMA))
        return open_catalog(lake)

    assert run_shell(factory, fmt="csv", stdin=io.StringIO(script), out=out, err=err) == 0
    out.flush()
    assert out.buffer.getvalue().decode().splitlines() == ['"n"', "0", '"n"', "4"]  # type: ignore[attr-defined]
    assert "lake " in err.getvalue()


def test_duckdb_route_does_not_import_pandas(lake: Settings) -> None:
    # pyarrow imports pandas (a second or more of start-up) as soon as it builds arrays from Python
    # objects; `sensormine sql -c` on a local lake must not pay that.
    script = (
        "import io, sys\n"
        "from lake.catalog import open_catalog\n"
        "from lake.sqlshell import run_script\n"
        "from sensormine.settings import Settings\n"
        f"settings = Settings(lake_uri={lake.lake_root!r})\n"
        "for tenants in (None, ['acme']):\n"
        "    with open_catalog(settings, tenants) as catalog:\n"
        "        for fmt in ('table', 'csv'):\n"
        "            run_script(catalog, 'SELECT * FROM telemetry_1h LIMIT 3', fmt=fmt, out=io.StringIO())\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_query_benchmark_runs_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.query import Shape, day_table, main

    shape = Shape.for_rows(10_000, tenants=2, days=31, devices=3, metrics=2)
    assert shape.samples == 27 and shape.rows == 2 * 31 * 3 * 2 * 27  # the first whole count >= 10,000
    day = day_table(shape, 1, DAY0, np.random.default_rng(0))
    assert day.schema.equals(TELEMETRY_SCHEMA) and day.num_rows == 3 * 2 * 27
    keys = list(zip(*(day.column(c).to_pylist() for c in ("device_id", "metric", "ts")), strict=True))
    assert keys == sorted(keys) and set(day.column("tenant_id").to_pylist()) == {"t01"}
    assert {d for d in day.column("date").to_pylist()} == {DAY0}

    argv = [
        "--rows",
        "10000",
        "--tenants",
        "2",
        "--days",
        "31",
        "--devices",
        "3",
        "--metrics",
        "2",
        "--layout",
        "presorted",
    ]
    main([*argv, "--repeat", "1", "--process-runs", "0", "--dir", str(tmp_path)])
    report = capsys.readouterr().out
    assert f"{shape.rows:,}-row lake" in report
    for path in ("bare DuckDB -> Arrow", "catalog -> Arrow", "sensormine sql path -> CSV"):
        assert path in report
    built = (tmp_path / shape.name / "bench-lake.json").stat().st_mtime
    main([*argv, "--repeat", "1", "--process-runs", "0", "--dir", str(tmp_path)])  # reuses the cached lake
    assert (tmp_path / shape.name / "bench-lake.json").stat().st_mtime == built
