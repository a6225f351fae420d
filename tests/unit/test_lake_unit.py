"""Pure parts of the lake and its Dagster wiring: predicates, filters, CSV parsing, partition keys, cursors."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from assets.telemetry import parse_partition_key, telemetry_partition_key
from lake.storage import LakeError, partition_predicate, table_uri
from lake.telemetry import TELEMETRY_SCHEMA, _csv_batches, day_bounds, pruning_filters, row_filter
from orchestration.resources import LakeResource
from sensormine.reading import Reading, datetime_to_us, readings_to_table
from sensormine.settings import Settings
from sensors.tenants import parse_cursor

D = date(2026, 3, 1)


def test_partition_predicate_selects_one_tenant_day() -> None:
    assert partition_predicate("acme-2", D) == "tenant_id = 'acme-2' AND date = '2026-03-01'"


@pytest.mark.parametrize("bad", ["a' OR '1'='1", "ACME", "", "-acme", "a" * 64, "acme;drop"])
def test_partition_predicate_refuses_ids_that_are_not_tenant_ids(bad: str) -> None:
    with pytest.raises(LakeError):
        partition_predicate(bad, D)


def test_day_bounds_are_utc_midnights() -> None:
    start, end = day_bounds(D)
    assert (start, end) == (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


def test_pruning_filters_treat_end_as_exclusive() -> None:
    start, end = datetime(2026, 3, 1, 6, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC)
    assert pruning_filters(["b", "a", "a"], start, end) == [
        ("tenant_id", "in", ["a", "b"]),
        ("date", ">=", date(2026, 3, 1)),
        ("date", "<=", date(2026, 3, 2)),
    ]
    naive = datetime(2026, 3, 1, 23, 59)  # naive datetimes are UTC, as everywhere in the platform
    assert pruning_filters(["a"], end=naive, days=[D, D])[1:] == [("date", "<=", D), ("date", "in", [D])]


def test_pruning_filters_convert_offsets_to_utc_days() -> None:
    tokyo = timezone(timedelta(hours=9))
    start = datetime(2026, 3, 2, 3, tzinfo=tokyo)  # 2026-03-01 18:00 UTC
    assert pruning_filters(["a"], start=start)[1] == ("date", ">=", D)


def lake_rows() -> pa.Table:
    base = datetime_to_us(datetime(2026, 3, 1, tzinfo=UTC))
    rows = [
        Reading(t, d, m, base + i * 3_600_000_000, float(i), 0, base)
        for t in ("acme", "globex")
        for d in ("d1", "d2")
        for m in ("temp", "rpm")
        for i in range(30)  # crosses into 2026-03-02
    ]
    table = readings_to_table(rows)
    return table.append_column("date", pc.cast(table["ts"], pa.date32()))


def test_row_filter_is_exact() -> None:
    table = lake_rows()
    start, end = datetime(2026, 3, 1, 10, tzinfo=UTC), datetime(2026, 3, 1, 20, tzinfo=UTC)
    got = table.filter(row_filter(["acme"], ["d2"], ["rpm"], start, end))
    assert got.num_rows == 10
    assert set(got["tenant_id"].to_pylist()) == {"acme"}
    assert set(got["device_id"].to_pylist()) == {"d2"}
    assert set(got["metric"].to_pylist()) == {"rpm"}
    assert min(got["ts"].to_pylist()) == start
    assert max(got["ts"].to_pylist()) == end - timedelta(hours=1)
    assert table.filter(row_filter(["acme"], days=[date(2026, 3, 2)])).num_rows == 2 * 2 * 6


def test_row_filter_with_empty_lists_matches_nothing() -> None:
    table = lake_rows()
    assert table.filter(row_filter([])).num_rows == 0
    assert table.filter(row_filter(["acme"], device_ids=[])).num_rows == 0
    assert table.filter(row_filter(["acme"], days=[])).num_rows == 0


def test_csv_block_parses_postgres_output_exactly() -> None:
    """COPY ... (FORMAT CSV) text as PostgreSQL writes it: quoting, empty strings, special floats."""
    block = (
        b'acme,"dev,""1""","temp\nC",2026-03-01 00:00:00.000001,NaN,2,2026-03-01 00:00:05\n'
        b'acme,NULL,"",2026-03-01 23:59:59.999999,-Infinity,0,2026-03-02 00:00:00\n'
        b"acme,d1,x,2026-03-01 12:00:00,0.30000000000000004,1,2026-03-01 12:00:00.5\n"
    )
    [batch] = _csv_batches(block)
    assert batch.schema == TELEMETRY_SCHEMA
    rows = batch.to_pylist()
    assert [r["device_id"] for r in rows] == ['dev,"1"', "NULL", "d1"]
    assert [r["metric"] for r in rows] == ["temp\nC", "", "x"]
    assert math.isnan(rows[0]["value"]) and rows[1]["value"] == -math.inf and rows[2]["value"] == 0.1 + 0.2
    assert rows[0]["ts"] == datetime(2026, 3, 1, 0, 0, 0, 1, tzinfo=UTC)
    assert rows[2]["ingest_ts"] == datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    assert [r["date"] for r in rows] == [D, D, D]
    assert [r["quality"] for r in rows] == [2, 0, 1]


def test_partition_keys_round_trip() -> None:
    key = telemetry_partition_key("acme", D)
    assert str(key) == "2026-03-01|acme"
    assert parse_partition_key(key) == ("acme", D)
    assert parse_partition_key("2026-03-01|acme") == ("acme", D)
    assert parse_partition_key(dg.MultiPartitionKey({"tenant": "b", "date": "2026-01-02"})) == ("b", date(2026, 1, 2))


@pytest.mark.parametrize("bad", ["2026-03-01", "acme|2026-03-01", "2026-03-01|", ""])
def test_parse_partition_key_rejects_other_shapes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_partition_key(bad)


def test_sensor_cursor() -> None:
    assert parse_cursor(None) == []
    assert parse_cursor("") == []
    assert parse_cursor('["acme", "globex"]') == ["acme", "globex"]
    with pytest.raises(ValueError):
        parse_cursor('{"acme": 1}')


def test_storage_options_add_conditional_put_only_on_s3(tmp_path: Path) -> None:
    local = Settings(lake_uri=str(tmp_path / "lake"), s3_endpoint="http://127.0.0.1:9")
    assert local.storage_options() == {}
    assert table_uri(local, "telemetry") == f"{tmp_path}/lake/telemetry"
    s3 = Settings(lake_uri="s3://bucket/lake/", s3_endpoint="http://127.0.0.1:9", s3_access_key="k", s3_secret_key="s")
    opts = s3.storage_options()
    assert opts["aws_conditional_put"] == "etag"
    assert opts["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert table_uri(s3, "telemetry") == "s3://bucket/lake/telemetry"


def test_lake_resource_values_win_over_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSORMINE_LAKE_URI", "s3://somewhere-else/lake")
    monkeypatch.setenv("SENSORMINE_S3_ENDPOINT", "http://127.0.0.1:9")
    settings = LakeResource(state_dir=str(tmp_path)).settings()
    assert settings.lake_root == str((tmp_path / "lake").resolve())
    assert settings.s3_endpoint is None
    assert (
        LakeResource(lake_uri="s3://b/l", s3_region="eu-west-1").settings().storage_options()["AWS_REGION"]
        == "eu-west-1"
    )
