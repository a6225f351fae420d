"""Compaction of hot-store tenant-days into the Delta telemetry table, on a local folder and on S3 (moto)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

import lake.storage as lake_storage
import lake.telemetry as lake_telemetry
from lake.storage import table_uri
from lake.telemetry import TELEMETRY_SCHEMA, compact_day, read_telemetry
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import LAKE, connect
from sensormine.reading import READING_SCHEMA, Reading, readings_to_table
from sensormine.settings import Settings
from tests.factories import DAY, DAY_US, make_tenant, readings

pytestmark = pytest.mark.integration

D = DAY.date()
HOUR_US = 3_600_000_000
SORT = [("tenant_id", "ascending"), ("device_id", "ascending"), ("metric", "ascending"), ("ts", "ascending")]


def day_readings(tenant_id: str, devices: tuple[str, ...] = ("d1", "d2"), n: int = 30) -> list[Reading]:
    """Readings of one tenant on day D, hourly-ish, with distinct ingest times."""
    out: list[Reading] = []
    for k, device in enumerate(devices):
        for r in readings(tenant_id, device, n, start_us=DAY_US, step_us=HOUR_US * 24 // n):
            out.append(r._replace(value=r.value + k * 1000, quality=r.ts % 3, ingest_ts=r.ts + 5_000_000))
    return out


def expected(rows: list[Reading]) -> pa.Table:
    """The rows as the lake must return them: READING_SCHEMA, sorted, deduped by the hot store."""
    unique = {r.key: r for r in rows}
    return readings_to_table(list(unique.values())).sort_by(SORT)


def delta(settings: Settings) -> DeltaTable:
    return DeltaTable(table_uri(settings, "telemetry"), storage_options=settings.storage_options())


def compactions(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT tenant_id, day, row_count, table_version, hot_watermark FROM lake_compactions ORDER BY 1, 2"
    ).fetchall()


def test_compact_day_writes_exactly_the_tenant_day(conn: psycopg.Connection, lake_settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_readings("acme")
    # Neighbours just outside the day must stay out of its partition.
    edges = [
        Reading("acme", "d1", "temperature", DAY_US - 1, -1.0, 0, DAY_US),
        Reading("acme", "d1", "temperature", DAY_US + 24 * HOUR_US, -2.0, 0, DAY_US + 24 * HOUR_US),
    ]
    HotStoreWriter(conn).write(rows + edges)

    result = compact_day(conn, lake_settings, "acme", D)

    assert result.rows == len(rows)
    assert result.table_version == 1  # 0 created the empty table, 1 is this write
    assert result.hot_watermark is not None
    assert result.hot_watermark.timestamp() * 1e6 == max(r.ingest_ts for r in rows)
    assert read_telemetry(lake_settings, ["acme"]).equals(expected(rows))

    # As stored: one partition folder, the date column, rows already sorted by device, metric, ts.
    dt = delta(lake_settings)
    stored = dt.to_pyarrow_table()
    assert stored.schema.names == TELEMETRY_SCHEMA.names
    assert stored.drop_columns(["date"]).cast(READING_SCHEMA).equals(expected(rows))
    assert pc.all(pc.equal(stored["date"], pa.scalar(D, pa.date32()))).as_py()
    assert all(f"tenant_id=acme/date={D.isoformat()}/" in uri for uri in dt.file_uris())
    assert dt.metadata().partition_columns == ["tenant_id", "date"]
    history = dt.history()
    assert [h["operation"] for h in history] == ["WRITE", "CREATE TABLE"]
    assert history[0]["operationParameters"]["mode"] == "Overwrite"
    assert history[0]["sensormine.operation"] == "compact_day"
    assert compactions(conn) == [("acme", D, len(rows), 1, result.hot_watermark)]


def test_recompaction_replaces_the_partition_without_duplicates(
    conn: psycopg.Connection, lake_settings: Settings
) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_readings("acme")
    HotStoreWriter(conn).write(rows)
    first = compact_day(conn, lake_settings, "acme", D)
    before = read_telemetry(lake_settings, ["acme"])

    again = compact_day(conn, lake_settings, "acme", D)

    assert (again.rows, again.table_version) == (first.rows, first.table_version + 1)
    assert read_telemetry(lake_settings, ["acme"]).equals(before)
    assert delta(lake_settings).to_pyarrow_table().num_rows == len(rows)

    # Late rows arrive in the hot store: the next run picks them up and moves the watermark.
    late = [Reading("acme", "d2", "humidity", DAY_US + 7, 55.5, 1, DAY_US + 48 * HOUR_US)]
    HotStoreWriter(conn).write(late)
    third = compact_day(conn, lake_settings, "acme", D)
    assert third.rows == len(rows) + 1
    assert read_telemetry(lake_settings, ["acme"]).equals(expected(rows + late))
    assert compactions(conn) == [("acme", D, len(rows) + 1, 3, third.hot_watermark)]
    assert [h["version"] for h in delta(lake_settings).history()] == [3, 2, 1, 0]


def test_empty_day_removes_the_partition_rows(conn: psycopg.Connection, lake_settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    HotStoreWriter(conn).write(day_readings("acme"))
    compact_day(conn, lake_settings, "acme", D)
    with conn.transaction():
        conn.execute("DELETE FROM telemetry WHERE tenant_id = 'acme'")

    result = compact_day(conn, lake_settings, "acme", D)

    assert (result.rows, result.table_version, result.hot_watermark) == (0, 2, None)
    assert read_telemetry(lake_settings, ["acme"]).num_rows == 0
    assert delta(lake_settings).file_uris() == []
    assert compactions(conn) == [("acme", D, 0, 2, None)]


def test_tenants_are_isolated(conn: psycopg.Connection, lake_settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    make_tenant(conn, "globex", ["d1"])
    acme, globex = day_readings("acme"), day_readings("globex", devices=("d1",), n=12)
    HotStoreWriter(conn).write(acme + globex)
    compact_day(conn, lake_settings, "acme", D)
    acme_files = delta(lake_settings).file_uris()

    compact_day(conn, lake_settings, "globex", D)

    assert read_telemetry(lake_settings, ["acme"]).equals(expected(acme))
    assert read_telemetry(lake_settings, ["globex"]).equals(expected(globex))
    assert read_telemetry(lake_settings, ["acme", "globex"]).equals(expected(acme + globex))
    assert read_telemetry(lake_settings, ["initech"]).num_rows == 0
    assert read_telemetry(lake_settings, []).num_rows == 0
    # Overwriting globex's partition left acme's files untouched.
    assert set(acme_files) < set(delta(lake_settings).file_uris())
    # Recompacting one tenant never touches the other.
    with conn.transaction():
        conn.execute("DELETE FROM telemetry WHERE tenant_id = 'globex'")
    compact_day(conn, lake_settings, "globex", D)
    assert read_telemetry(lake_settings, ["acme", "globex"]).equals(expected(acme))


def test_read_filters_devices_metrics_and_time(conn: psycopg.Connection, lake_settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_readings("acme")
    next_day = [r._replace(ts=r.ts + 24 * HOUR_US) for r in rows[:10]]
    HotStoreWriter(conn).write(rows + next_day)
    compact_day(conn, lake_settings, "acme", D)
    compact_day(conn, lake_settings, "acme", D + timedelta(days=1))
    everything = expected(rows + next_day)

    def want(keep) -> pa.Table:
        return expected([r for r in rows + next_day if keep(r)])

    assert read_telemetry(lake_settings, ["acme"]).equals(everything)
    assert read_telemetry(lake_settings, ["acme"], device_ids=["d2"]).equals(want(lambda r: r.device_id == "d2"))
    assert read_telemetry(lake_settings, ["acme"], metrics=["pressure"]).equals(want(lambda r: r.metric == "pressure"))
    start, end = DAY + timedelta(hours=6), DAY + timedelta(hours=12)
    assert read_telemetry(lake_settings, ["acme"], start=start, end=end).equals(
        want(lambda r: DAY_US + 6 * HOUR_US <= r.ts < DAY_US + 12 * HOUR_US)
    )
    # end is exclusive: midnight of the next day reads none of it.
    assert read_telemetry(lake_settings, ["acme"], start=DAY, end=DAY + timedelta(days=1)).equals(expected(rows))
    assert read_telemetry(lake_settings, ["acme"], days=[D + timedelta(days=1)]).equals(expected(next_day))
    assert read_telemetry(lake_settings, ["acme"], days=[]).num_rows == 0


def test_read_before_any_compaction_returns_an_empty_typed_table(lake_settings: Settings) -> None:
    got = read_telemetry(lake_settings, ["acme"], start=DAY, end=DAY + timedelta(days=1))
    assert got.num_rows == 0
    assert got.schema == READING_SCHEMA


def test_csv_transfer_keeps_nan_inf_and_quoted_identifiers(conn: psycopg.Connection, settings: Settings) -> None:
    """Regression guard for the COPY CSV path: special floats, quotes, commas and newlines survive."""
    make_tenant(conn, "acme", [])
    odd = [
        Reading("acme", 'dev,"1"', "temp\nC", DAY_US + 1, float("nan"), 2, DAY_US + 2),
        Reading("acme", 'dev,"1"', "temp\nC", DAY_US + 2, float("inf"), 0, DAY_US + 3),
        Reading("acme", "NULL", "", DAY_US + 3, float("-inf"), 0, DAY_US + 4),
        Reading("acme", "d1", "x", DAY_US + 4, 0.1 + 0.2, 1, DAY_US + 5),
        Reading("acme", "d1", "x", DAY_US + 5, 5e-324, 1, DAY_US + 6),
        Reading("acme", "d1", "x", DAY_US + 6, -1.7976931348623157e308, 1, DAY_US + 7),
    ]
    HotStoreWriter(conn).write(odd)
    conn.execute("SET DateStyle = 'SQL, DMY'")  # a server or session default must not change the transfer
    conn.commit()

    compact_day(conn, settings, "acme", D)

    got = read_telemetry(settings, ["acme"]).to_pylist()
    want = expected(odd).to_pylist()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w["value"], float) and math.isnan(w["value"]):
            assert math.isnan(g.pop("value")) and w.pop("value") is not None
        assert g == w


def test_concurrent_compactions_of_one_tenant_day_serialise(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_readings("acme", n=500)
    HotStoreWriter(conn).write(rows)
    assert settings.database_url

    def run() -> int:
        with connect(settings, role=LAKE) as own:
            return compact_day(own, settings, "acme", D).table_version

    with ThreadPoolExecutor(max_workers=3) as pool:
        versions = sorted(pool.map(lambda _: run(), range(3)))

    assert len(set(versions)) == 3
    assert read_telemetry(settings, ["acme"]).equals(expected(rows))
    assert compactions(conn)[0][3] == versions[-1]


def test_failed_lake_write_rolls_back(
    conn: psycopg.Connection, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tenant(conn, "acme", ["d1", "d2"])
    rows = day_readings("acme", n=2000)
    HotStoreWriter(conn).write(rows)
    compact_day(conn, settings, "acme", D)
    recorded = compactions(conn)
    monkeypatch.setattr(lake_telemetry, "_BLOCK_BYTES", 4096)  # many blocks

    def failing_write(table, data, **kwargs) -> None:
        next(iter(data))
        raise OSError("object store went away")

    monkeypatch.setattr(lake_storage, "write_deltalake", failing_write)
    with pytest.raises(OSError, match="went away"):
        compact_day(conn, settings, "acme", D)

    assert conn.execute("SELECT count(*) FROM telemetry").fetchone() == (len(rows),)  # connection still usable
    assert compactions(conn) == recorded
    assert delta(settings).version() == 1
