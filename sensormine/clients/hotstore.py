"""Writes readings into the hot store with COPY, exactly once per Kafka offset and per dedupe key."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date

import psycopg
from psycopg import sql

from sensormine.clients._pgcopy import COPY_HEADER, COPY_TRAILER, PG_EPOCH_US, ROW_TAIL, series_prefix
from sensormine.clients.latest import SeriesPoint, newest_per_series, notify_latest
from sensormine.clients.postgres import ensure_partitions, epoch_day_to_date, existing_partition_days, partition_name
from sensormine.reading import Reading, day_of, us_to_datetime

COLUMNS = ("tenant_id", "device_id", "metric", "ts", "value", "quality", "ingest_ts")
_COPY_SQL = f"COPY {{}} ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
STAGE = "telemetry_stage"
# The dedupe path's staging table, spelled out: LIKE telemetry would need the right to read telemetry.
_STAGE_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (tenant_id text NOT NULL, device_id text NOT NULL, "
    "metric text NOT NULL, ts timestamptz NOT NULL, value double precision NOT NULL, "
    "quality smallint NOT NULL DEFAULT 0, ingest_ts timestamptz NOT NULL DEFAULT now()) ON COMMIT DELETE ROWS"
)
_COPY_TYPES = ("text", "text", "text", "timestamptz", "float8", "int2", "timestamptz")

_CHUNK_BYTES = 1 << 20


class CopyBatch:
    """Readings pre-encoded as binary COPY rows of `telemetry`, bucketed by (day, tenant, device) then metric.

    Rows are emitted series by series in primary-key order (C collation), day by day. B-tree
    inserts in key order stay on a few hot leaf pages instead of hopping between one page per
    series for every row: on the ingest benchmark this alone made the server's COPY about 1.7x
    faster (docs/benchmarks.md). The order is a speed hint only; correctness never depends on it.
    """

    __slots__ = ("_devices", "rows")

    # For fast-path encoders (telemetry.payload.decode_envelope_into) that append pre-packed rows to
    # `device(...)` buckets: a row's tail is pack_tail(ts - PG_EPOCH_US, 8, value, 2, quality, 8,
    # ingest_ts - PG_EPOCH_US). The wire format itself stays in the clients package.
    PG_EPOCH_US = PG_EPOCH_US
    pack_tail = staticmethod(ROW_TAIL.pack)

    def __init__(self) -> None:
        self._devices: dict[tuple[int, str, str], dict[str, list[bytes]]] = {}
        self.rows = 0

    def device(self, day: int, tenant_id: str, device_id: str) -> dict[str, list[bytes]]:
        """The metric → encoded-row-tails buckets of one device on one UTC day (created on first use).

        Fast-path encoders append `pack_tail(...)` bytes to these lists and then add to `rows`.
        """
        key = (day, tenant_id, device_id)
        buckets = self._devices.get(key)
        if buckets is None:
            buckets = self._devices[key] = {}
        return buckets

    def add_readings(self, readings: Iterable[Reading]) -> None:
        """Encode readings into the batch, all or none: TypeError or ValueError on a field COPY cannot carry."""
        encoded = []
        for r in readings:
            if not (type(r.tenant_id) is type(r.device_id) is type(r.metric) is str):
                raise TypeError(f"tenant_id, device_id and metric must be text: {r.key!r}")
            try:
                tail = ROW_TAIL.pack(r.ts - PG_EPOCH_US, 8, r.value, 2, r.quality, 8, r.ingest_ts - PG_EPOCH_US)
            except struct.error as exc:
                raise ValueError(f"cannot encode {r!r}: {exc}") from None
            encoded.append((day_of(r.ts), r.tenant_id, r.device_id, r.metric, tail))
        for day, tenant_id, device_id, metric, tail in encoded:
            buckets = self.device(day, tenant_id, device_id)
            rows = buckets.get(metric)
            if rows is None:
                buckets[metric] = [tail]
            else:
                rows.append(tail)
        self.rows += len(encoded)

    @property
    def day_numbers(self) -> set[int]:
        """The UTC day numbers the rows fall in (one partition each)."""
        return {day for day, _, _ in self._devices}

    @property
    def tenant_days(self) -> set[tuple[str, int]]:
        """The (tenant, UTC day number) pairs the rows fall in (one late-write log row each)."""
        return {(tenant_id, day) for day, tenant_id, _ in self._devices}

    def newest(self) -> list[SeriesPoint]:
        """The newest reading of each series in the batch, as (tenant, device, metric, ts µs, value, quality)."""
        best: dict[tuple[str, str, str], tuple[int, float, int]] = {}
        for (_, tenant_id, device_id), buckets in self._devices.items():
            for metric, tails in buckets.items():
                top = max(tails)
                if top[0] >= 0x80:  # a timestamp before 2000 (negative): bytes do not sort by time
                    top = max(tails, key=lambda t: ROW_TAIL.unpack(t)[0])
                ts, _, value, _, quality, _, _ = ROW_TAIL.unpack(top)
                key = (tenant_id, device_id, metric)
                have = best.get(key)
                if have is None or ts + PG_EPOCH_US > have[0]:
                    best[key] = (ts + PG_EPOCH_US, value, quality)
        return [(*k, *v) for k, v in best.items()]

    def chunks(self, day: int | None = None) -> Iterator[bytes]:
        """The binary COPY stream (header, rows in key order, trailer) of one UTC day, or of all, in ~1 MiB pieces."""
        parts: list[bytes] = [COPY_HEADER]
        size = 0
        for key in sorted(self._devices):
            if day is not None and key[0] != day:
                continue
            _, tenant_id, device_id = key
            buckets = self._devices[key]
            for metric in sorted(buckets):
                prefix = series_prefix(tenant_id, device_id, metric)
                # prefix + tail for every row, without a Python step per row
                parts.append(prefix)
                part = prefix.join(buckets[metric])
                parts.append(part)
                size += len(part)
                if size >= _CHUNK_BYTES:
                    yield b"".join(parts)
                    parts, size = [], 0
        parts.append(COPY_TRAILER)
        yield b"".join(parts)


@dataclass(frozen=True)
class KafkaOffset:
    """The next offset to consume for one Kafka partition, stored with the rows it covers."""

    topic: str
    partition: int
    next_offset: int


@dataclass
class WriteResult:
    """What one batch did: rows inserted, and duplicates skipped."""

    inserted: int = 0
    duplicates: int = 0
    partitions_created: list[date] = field(default_factory=list)


InTransaction = Callable[[psycopg.Connection], object]
"""Work done in a batch's transaction, after its rows and offsets."""


class HotStoreWriter:
    """Batch writer for one connection; remembers which day partitions exist."""

    def __init__(self, conn: psycopg.Connection, consumer_group: str | None = None) -> None:
        self.conn = conn
        self.consumer_group = consumer_group
        self._known_days: set[date] = existing_partition_days(conn)
        conn.commit()

    def write(
        self, readings: Sequence[Reading], offsets: Sequence[KafkaOffset] = (), also: InTransaction | None = None
    ) -> WriteResult:
        """Insert `readings` and record `offsets` in one transaction; rows already present are skipped.

        `also` runs in the same transaction (the usage events metering the batch), so it commits exactly
        when the rows and offsets do."""
        by_day: dict[int, list[Reading]] = {}
        tenant_days: set[tuple[str, int]] = set()
        for r in readings:  # one pass: each day's rows for its partition, and the (tenant, day) pairs
            day = day_of(r.ts)
            by_day.setdefault(day, []).append(r)
            tenant_days.add((r.tenant_id, day))
        return self._write(
            len(readings),
            tenant_days,
            lambda day, table: self._copy(by_day[day] if day is not None else readings, table),
            offsets,
            lambda: newest_per_series((r.tenant_id, r.device_id, r.metric, r.ts, r.value, r.quality) for r in readings),
            also,
        )

    def write_batch(
        self, batch: CopyBatch, offsets: Sequence[KafkaOffset] = (), also: InTransaction | None = None
    ) -> WriteResult:
        """Like `write`, for rows already encoded for binary COPY (the consumer's fast path)."""
        if self.conn.info.encoding != "utf-8":
            # CopyBatch encodes text as UTF-8; the server reads COPY text in the client encoding.
            raise RuntimeError(f"binary COPY batches need client_encoding UTF8, not {self.conn.info.encoding}")
        return self._write(
            batch.rows,
            batch.tenant_days,
            lambda day, table: self._copy_stream(batch.chunks(day), table),
            offsets,
            batch.newest,
            also,
        )

    def _write(
        self,
        n_rows: int,
        tenant_days: set[tuple[str, int]],
        copy: Callable[[int | None, str], None],
        offsets: Sequence[KafkaOffset],
        newest: Callable[[], list[SeriesPoint]],
        also: InTransaction | None,
    ) -> WriteResult:
        result = WriteResult()
        days = {epoch_day_to_date(d) for d in {d for _, d in tenant_days}}
        with self.conn.transaction():
            if not days <= self._known_days:
                result.partitions_created = ensure_partitions(self.conn, days - self._known_days)
            if n_rows:
                try:
                    with self.conn.transaction():  # savepoint: a duplicate key falls back to the dedupe path
                        # Straight into each day's partition: COPY cannot run under telemetry's row-level
                        # security, and the writer role may insert into partitions only (migration 016).
                        for day in sorted({d for _, d in tenant_days}):
                            copy(day, partition_name(epoch_day_to_date(day)))
                    result.inserted = n_rows
                except psycopg.errors.UniqueViolation:
                    result.inserted = self._insert_dedupe(copy)
                    result.duplicates = n_rows - result.inserted
                if result.inserted:
                    self._log_writes(tenant_days)
                    notify_latest(self.conn, newest())  # delivered to API processes at commit
            if offsets:
                self._store_offsets(offsets)
            if also is not None:
                also(self.conn)
        # Only now: a failed batch rolls its CREATE TABLE back, and a retry must create the partition again.
        self._known_days |= days
        return result

    def _copy(self, readings: Sequence[Reading], table: str) -> None:
        cur = self.conn.cursor()
        with cur.copy(sql.SQL(_COPY_SQL).format(sql.Identifier(table))) as copy:
            copy.set_types(_COPY_TYPES)
            for r in readings:
                ts, ingest_ts = us_to_datetime(r.ts), us_to_datetime(r.ingest_ts)
                copy.write_row((r.tenant_id, r.device_id, r.metric, ts, r.value, r.quality, ingest_ts))

    def _copy_stream(self, chunks: Iterable[bytes], table: str) -> None:
        with self.conn.cursor().copy(sql.SQL(_COPY_SQL).format(sql.Identifier(table))) as copy:
            for chunk in chunks:
                copy.write(chunk)

    def _insert_dedupe(self, copy: Callable[[int | None, str], None]) -> int:
        self.conn.execute(_STAGE_DDL)
        copy(None, STAGE)
        cur = self.conn.execute(
            f"INSERT INTO telemetry ({', '.join(COLUMNS)}) "
            f"SELECT DISTINCT ON (tenant_id, device_id, metric, ts) {', '.join(COLUMNS)} FROM {STAGE} "
            "ON CONFLICT DO NOTHING"
        )
        return cur.rowcount

    def _log_writes(self, tenant_days: set[tuple[str, int]]) -> None:
        """One hot_write_log row per (tenant, day) written, with this transaction's id (docs/query.md "Late rows").

        In the rows' transaction, so the log row exists exactly when the rows do; one statement per batch.
        """
        pairs = sorted(tenant_days)
        self.conn.execute(
            "INSERT INTO hot_write_log (tenant_id, day) SELECT * FROM unnest(%s::text[], %s::date[]) "
            "ON CONFLICT DO NOTHING",
            ([t for t, _ in pairs], [epoch_day_to_date(d) for _, d in pairs]),
        )

    def _store_offsets(self, offsets: Sequence[KafkaOffset]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO ingest_offsets (consumer_group, topic, kafka_partition, next_offset) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (consumer_group, topic, kafka_partition) "
                "DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()",
                [(self.consumer_group, o.topic, o.partition, o.next_offset) for o in offsets],
            )


def stored_offsets(conn: psycopg.Connection, consumer_group: str) -> dict[tuple[str, int], int]:
    """The committed next offsets of a consumer group, by (topic, partition)."""
    rows = conn.execute(
        "SELECT topic, kafka_partition, next_offset FROM ingest_offsets WHERE consumer_group = %s", (consumer_group,)
    ).fetchall()
    return {(t, p): o for t, p, o in rows}
