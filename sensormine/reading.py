"""The Reading: one metric value of one device at one instant, in long format."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa

QUALITY_GOOD = 0
QUALITY_UNCERTAIN = 1
QUALITY_BAD = 2

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US_PER_DAY = 86_400_000_000


class Reading(NamedTuple):
    """One point. `ts` and `ingest_ts` are UTC microseconds since the epoch.

    Its dedupe identity is (tenant_id, device_id, metric, ts).
    """

    tenant_id: str
    device_id: str
    metric: str
    ts: int
    value: float
    quality: int = QUALITY_GOOD
    ingest_ts: int = 0

    @property
    def key(self) -> tuple[str, str, str, int]:
        """The dedupe identity."""
        return (self.tenant_id, self.device_id, self.metric, self.ts)


READING_SCHEMA = pa.schema(
    [
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("quality", pa.int16(), nullable=False),
        pa.field("ingest_ts", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def us_to_datetime(us: int) -> datetime:
    """UTC datetime from epoch microseconds."""
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


def datetime_to_us(dt: datetime) -> int:
    """Epoch microseconds from an aware datetime (naive is taken as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def now_us() -> int:
    """The current time in epoch microseconds."""
    return datetime_to_us(datetime.now(UTC))


def day_of(us: int) -> int:
    """The UTC day number (days since the epoch) that a timestamp falls in."""
    return us // US_PER_DAY


def rows_to_table(rows: Sequence[Sequence[Any]], schema: pa.Schema) -> pa.Table:
    """Columnar table of row tuples whose fields follow `schema`."""
    cols: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
    arrays = [pa.array(col, type=field.type) for col, field in zip(cols, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def readings_to_table(readings: Sequence[Reading]) -> pa.Table:
    """Columnar form of readings, in READING_SCHEMA."""
    return rows_to_table(readings, READING_SCHEMA)
