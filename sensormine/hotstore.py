"""Writes readings into the hot store with COPY, exactly once per Kafka offset and per dedupe key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

import psycopg

from sensormine.db import ensure_partitions, epoch_day_to_date, existing_partition_days
from sensormine.reading import Reading, day_of, us_to_datetime

COLUMNS = ("tenant_id", "device_id", "metric", "ts", "value", "quality", "ingest_ts")
_COPY_SQL = f"COPY telemetry ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ("text", "text", "text", "timestamptz", "float8", "int2", "timestamptz")


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


class HotStoreWriter:
    """Batch writer for one connection; remembers which day partitions exist."""

    def __init__(self, conn: psycopg.Connection, consumer_group: str | None = None) -> None:
        self.conn = conn
        self.consumer_group = consumer_group
        self._known_days: set[date] = existing_partition_days(conn)
        conn.commit()

    def write(self, readings: Sequence[Reading], offsets: Sequence[KafkaOffset] = ()) -> WriteResult:
        """Insert `readings` and record `offsets` in one transaction; rows already present are skipped."""
        result = WriteResult()
        with self.conn.transaction():
            days = {epoch_day_to_date(d) for d in {day_of(r.ts) for r in readings}}
            if not days <= self._known_days:
                result.partitions_created = ensure_partitions(self.conn, days - self._known_days)
                self._known_days |= days
            if readings:
                try:
                    with self.conn.transaction():  # savepoint: a duplicate key falls back to the dedupe path
                        self._copy(readings)
                    result.inserted = len(readings)
                except psycopg.errors.UniqueViolation:
                    result.inserted = self._insert_dedupe(readings)
                    result.duplicates = len(readings) - result.inserted
            if offsets:
                self._store_offsets(offsets)
        return result

    def _copy(self, readings: Sequence[Reading], table: str = "telemetry") -> None:
        cur = self.conn.cursor()
        with cur.copy(_COPY_SQL.replace("telemetry", table, 1)) as copy:
            copy.set_types(_COPY_TYPES)
            for r in readings:
                copy.write_row(
                    (r.tenant_id, r.device_id, r.metric, us_to_datetime(r.ts), r.value, r.quality, us_to_datetime(r.ingest_ts))
                )

    def _insert_dedupe(self, readings: Sequence[Reading]) -> int:
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS telemetry_stage (LIKE telemetry INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        self._copy(readings, table="telemetry_stage")
        cur = self.conn.execute(
            f"INSERT INTO telemetry ({', '.join(COLUMNS)}) "
            f"SELECT DISTINCT ON (tenant_id, device_id, metric, ts) {', '.join(COLUMNS)} FROM telemetry_stage "
            "ON CONFLICT DO NOTHING"
        )
        return cur.rowcount

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
