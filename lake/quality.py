"""Lake-side data-quality measurements: hot-vs-lake row-count parity of a tenant-day, and freshness.

Parity compares three counts of one compacted tenant-day:

* the rows in the lake's Delta partition now,
* `lake_compactions.row_count`, what the compaction recorded writing,
* the hot-store rows of that day visible in the compaction's snapshot (`hot_snapshot`).

Rows that reached the hot store after the compaction read it are late data for the next
compaction, not a mismatch: they are reported as `late_rows` and do not fail the check. When all
three counts agree the check records `verified_rows` / `verified_at` in `lake_compactions`, which
hot-store retention requires before it drops the day; a mismatch clears them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
import pyarrow as pa
import pyarrow.csv as pcsv
from psycopg import sql

from lake.storage import check_tenant_id
from lake.telemetry import day_bounds, lock_partition, row_filter, telemetry_dataset
from sensormine.clients.postgres import existing_partition_days
from sensormine.reading import READING_SCHEMA
from sensormine.settings import Settings

DEFAULT_MAX_AGE = timedelta(hours=3)
"""Freshness threshold: three hourly compactions may be missed before the check warns."""


def partition_table(settings: Settings, tenant_id: str, day: date) -> pa.Table:
    """Every row stored in the lake's (tenant_id, day) partition, in READING_SCHEMA, in file order.

    Selected by partition only (no row predicate on ts), so rows filed under the wrong day stay
    visible to the checks that look for them.
    """
    dataset = telemetry_dataset(settings, [check_tenant_id(tenant_id)], days=[day])
    table = dataset.to_table(columns=READING_SCHEMA.names, filter=row_filter([tenant_id], days=[day]))
    return table.cast(READING_SCHEMA)


def lake_row_count(settings: Settings, tenant_id: str, day: date) -> int:
    """Rows in the lake's (tenant_id, day) partition (from Parquet footers where possible)."""
    dataset = telemetry_dataset(settings, [check_tenant_id(tenant_id)], days=[day])
    return int(dataset.count_rows(filter=row_filter([tenant_id], days=[day])))


@dataclass(frozen=True)
class ParityResult:
    """Hot-vs-lake row-count parity of one tenant-day."""

    tenant_id: str
    day: date
    passed: bool
    reason: str
    lake_rows: int
    """Rows in the lake partition."""
    recorded_rows: int | None
    """`lake_compactions.row_count`; None when the day was never compacted."""
    hot_rows: int | None
    """Hot rows of the day visible in the compaction's snapshot; None when not compacted or the hot day is gone."""
    late_rows: int
    """Hot rows of the day the compaction did not see (committed later): left for the next compaction."""
    table_version: int | None
    compacted_at: datetime | None
    verified_at: datetime | None
    """When this check recorded the verification (None unless it passed and recorded it)."""


def _late(snapshot: str) -> sql.Composed:
    """SQL condition: row `t` of telemetry is not visible in `snapshot` (it committed after the compaction read)."""
    return sql.SQL("NOT sensormine_in_snapshot(t.xmin, {}::pg_snapshot)").format(sql.Literal(snapshot))


def _hot_counts(conn: psycopg.Connection, tenant_id: str, day: date, snapshot: str | None) -> tuple[int, int]:
    """(rows visible in `snapshot`, all rows) of the tenant-day in the hot store (all rows count when None)."""
    start, end = day_bounds(day)
    late = sql.SQL("false") if snapshot is None else _late(snapshot)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FILTER (WHERE NOT {}), count(*) FROM telemetry t "
            "WHERE t.tenant_id = {} AND t.ts >= {} AND t.ts < {}"
        ).format(late, sql.Literal(tenant_id), sql.Literal(start), sql.Literal(end))
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def check_parity(
    conn: psycopg.Connection, settings: Settings, tenant_id: str, day: date, record: bool = True
) -> ParityResult:
    """Compare the lake's (tenant_id, day) partition with the hot store and the compaction record.

    Passes when lake rows = recorded row_count = hot rows visible in the compaction snapshot.
    With `record`, a pass stores verified_rows/verified_at on the compaction and a failure
    clears them. Holds the tenant-day's compaction lock (shared), so it never measures a
    compaction half-way. Runs in its own transaction when `conn` is idle.
    """
    check_tenant_id(tenant_id)
    with conn.transaction():
        lock_partition(conn, tenant_id, day, shared=True)
        compaction = conn.execute(
            "SELECT row_count, table_version, hot_snapshot::text, compacted_at, verified_rows "
            "FROM lake_compactions WHERE tenant_id = %s AND day = %s",
            (tenant_id, day),
        ).fetchone()
        lake_rows = lake_row_count(settings, tenant_id, day)
        if compaction is None:
            return ParityResult(
                tenant_id, day, False, "the day has not been compacted (no lake_compactions row)",
                lake_rows, None, None, 0, None, None, None,
            )  # fmt: skip
        recorded, version, snapshot, compacted_at, verified = compaction
        late = 0
        hot: int | None
        if day not in existing_partition_days(conn):
            # No hot partition: the day never had rows, or retention dropped it, in which case only
            # a previously verified count can vouch for the lake.
            hot = None
            passed = lake_rows == recorded and (verified == recorded or recorded == 0)
            reason = (
                f"no hot partition for the day; lake holds the {recorded} rows compacted and verified"
                if passed
                else f"no hot partition for the day (dropped?); lake has {lake_rows} rows, "
                f"compaction recorded {recorded}, verified {verified}"
            )
        else:
            hot, total = _hot_counts(conn, tenant_id, day, snapshot)
            late = total - hot
            passed = lake_rows == recorded == hot
            if passed:
                reason = f"{lake_rows} rows in the lake, the compaction record and the hot store's snapshot"
            else:
                reason = (
                    f"mismatch: lake has {lake_rows} rows, compaction recorded {recorded}, "
                    f"hot store had {hot} in the compaction's snapshot"
                )
            if late:
                reason += f"; {late} late row(s) arrived after the compaction and await the next one"
        verified_at: datetime | None = None
        if record and passed:
            row = conn.execute(
                "UPDATE lake_compactions SET verified_rows = %s, verified_at = now() "
                "WHERE tenant_id = %s AND day = %s AND table_version = %s RETURNING verified_at",
                (lake_rows, tenant_id, day, version),
            ).fetchone()
            verified_at = row[0] if row else None
        elif record:
            conn.execute(
                "UPDATE lake_compactions SET verified_rows = NULL, verified_at = NULL "
                "WHERE tenant_id = %s AND day = %s",
                (tenant_id, day),
            )
    return ParityResult(
        tenant_id, day, passed, reason, lake_rows, recorded, hot, late, version, compacted_at, verified_at
    )


_DIFF_COLUMNS = ["device_id", "metric", "ts", "value"]
_DIFF_KEYS = ["device_id", "metric", "ts"]


def _hot_snapshot_rows(conn: psycopg.Connection, tenant_id: str, day: date, snapshot: str | None) -> pa.Table:
    """(device_id, metric, ts, value) of the hot rows of a tenant-day visible in `snapshot` (all rows if None)."""
    start, end = day_bounds(day)
    visible = (
        sql.SQL("")
        if snapshot is None
        else sql.SQL(" AND sensormine_in_snapshot(xmin, {}::pg_snapshot)").format(sql.Literal(snapshot))
    )
    query = sql.SQL(
        "COPY (SELECT device_id, metric, ts AT TIME ZONE 'UTC', value FROM telemetry "
        "WHERE tenant_id = {} AND ts >= {} AND ts < {}{}) TO STDOUT (FORMAT CSV)"
    ).format(sql.Literal(tenant_id), sql.Literal(start), sql.Literal(end), visible)
    block = bytearray()
    with conn.transaction():
        conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        conn.execute("SET LOCAL extra_float_digits = 1")
        with conn.cursor().copy(query) as copy:
            for chunk in copy:
                block += chunk
    types = {"device_id": pa.string(), "metric": pa.string(), "ts": pa.timestamp("us"), "value": pa.float64()}
    if not block:
        return pa.table({c: pa.array([], type=t) for c, t in types.items()}).cast(_diff_schema())
    table = pcsv.read_csv(
        pa.py_buffer(block),
        read_options=pcsv.ReadOptions(column_names=_DIFF_COLUMNS),
        convert_options=pcsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False),
    )
    return table.cast(_diff_schema())


def _diff_schema() -> pa.Schema:
    return pa.schema([READING_SCHEMA.field(c) for c in _DIFF_COLUMNS])


def parity_diff(
    conn: psycopg.Connection, settings: Settings, tenant_id: str, day: date, limit: int = 20
) -> list[dict[str, object]]:
    """A sample of the rows behind a parity mismatch, by dedupe key, at most `limit` of them.

    Each row says `missing_from_lake` (in the hot store's compaction snapshot, not in the lake)
    or `only_in_lake` (in the lake, not in that snapshot). Reads the whole day from both sides,
    so it is meant for the failure path only.
    """
    check_tenant_id(tenant_id)
    row = conn.execute(
        "SELECT hot_snapshot::text FROM lake_compactions WHERE tenant_id = %s AND day = %s", (tenant_id, day)
    ).fetchone()
    snapshot = row[0] if row else None
    hot = _hot_snapshot_rows(conn, tenant_id, day, snapshot)
    lake = partition_table(settings, tenant_id, day).select(_DIFF_COLUMNS)
    out: list[dict[str, object]] = []
    for side, left, right in (("missing_from_lake", hot, lake), ("only_in_lake", lake, hot)):
        rest = limit - len(out)
        if rest <= 0:
            break
        extra = left.join(right.select(_DIFF_KEYS), keys=_DIFF_KEYS, join_type="left anti")
        extra = extra.sort_by([(k, "ascending") for k in _DIFF_KEYS]).slice(0, rest)
        for r in extra.to_pylist():
            ts = r["ts"]
            out.append({"side": side, **r, "ts": ts.isoformat() if ts is not None else None})
    return out


@dataclass(frozen=True)
class FreshnessResult:
    """How far behind the lake is for one tenant."""

    tenant_id: str
    passed: bool
    reason: str
    checked_at: datetime
    max_age: timedelta
    last_compacted_at: datetime | None
    """When any of the tenant's days was last compacted."""
    newest_reading_at: datetime | None
    """Ingest time of the newest reading the lake holds for the tenant (max hot_watermark)."""

    @property
    def compaction_age(self) -> timedelta | None:
        """Time since the tenant's last compaction."""
        return None if self.last_compacted_at is None else self.checked_at - self.last_compacted_at

    @property
    def reading_age(self) -> timedelta | None:
        """Time since the newest reading in the lake reached the hot store."""
        return None if self.newest_reading_at is None else self.checked_at - self.newest_reading_at


def check_freshness(
    conn: psycopg.Connection, tenant_id: str, max_age: timedelta = DEFAULT_MAX_AGE, now: datetime | None = None
) -> FreshnessResult:
    """Whether the tenant's newest compaction and the newest reading it brought are at most `max_age` old."""
    check_tenant_id(tenant_id)
    checked_at = (now or datetime.now(UTC)).astimezone(UTC)
    row = conn.execute(
        "SELECT max(compacted_at), max(hot_watermark) FROM lake_compactions WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    compacted_at, newest = row if row else (None, None)
    problems = []
    if compacted_at is None:
        problems.append("no day of the tenant has been compacted")
    elif checked_at - compacted_at > max_age:
        problems.append(f"last compaction {checked_at - compacted_at} ago")
    if newest is None:
        problems.append("the lake holds no reading of the tenant")
    elif checked_at - newest > max_age:
        problems.append(f"newest reading in the lake arrived {checked_at - newest} ago")
    reason = (
        "; ".join(problems) + f" (threshold {max_age})"
        if problems
        else f"last compaction {checked_at - compacted_at} ago, newest reading {checked_at - newest} ago"
    )
    return FreshnessResult(tenant_id, not problems, reason, checked_at, max_age, compacted_at, newest)
