"""Batches of readings pushed over HTTP (`POST /api/ingest`): JSON or CSV, judged item by item.

Unlike an MQTT message (one payload, accepted or rejected whole), a batch is a container: each
item (a JSON reading object, a CSV row) is accepted or rejected on its own, and every rejected
item goes to the dead-letter queue with its reason and pointer. Only a body that is not a batch
at all (undecodable JSON or CSV, wrong shape, too large) is refused whole.

JSON: the MQTT payload contract, `{"ts", "values", "quality"?}` or an array of such objects.
CSV (UTF-8, header required), either
- long: columns `ts, metric, value` and optionally `quality`, one reading per row; or
- wide: a `ts` column and one column per metric, one item per row (empty cells are skipped),
  optionally a `quality` column.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import orjson

from sensormine.reading import Reading
from sensormine.telemetry.payload import (
    METRIC_RE,
    PayloadError,
    escape_pointer,
    parse_quality,
    parse_reading_item,
    parse_timestamp,
    parse_value,
    payload_items,
)

MAX_BATCH_READINGS = 100_000


@dataclass(frozen=True)
class ItemReject:
    """One rejected item: its position, its bytes (what the DLQ keeps) and why."""

    index: int
    payload: bytes
    error: PayloadError


@dataclass
class BatchOutcome:
    """The readings of the accepted items, and the rejected items."""

    readings: list[Reading] = field(default_factory=list)
    accepted_items: int = 0
    rejects: list[ItemReject] = field(default_factory=list)

    @property
    def items(self) -> int:
        """Items in the batch."""
        return self.accepted_items + len(self.rejects)

    def _add(self, readings: list[Reading]) -> None:
        if len(self.readings) + len(readings) > MAX_BATCH_READINGS:
            raise PayloadError(f"more than {MAX_BATCH_READINGS} readings in one batch: split it")
        self.readings.extend(readings)
        self.accepted_items += 1


def parse_json_batch(raw: bytes, tenant_id: str, device_id: str, ingest_ts: int) -> BatchOutcome:
    """Judge every item of a JSON batch; PayloadError when the body is not a JSON batch at all."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    items, base = payload_items(doc)
    out = BatchOutcome()
    for i, item in enumerate(items):
        ptr = base.format(i) if base else ""
        try:
            readings = parse_reading_item(item, ptr, tenant_id, device_id, ingest_ts)
        except PayloadError as exc:
            try:
                kept = orjson.dumps(item)
            except (TypeError, orjson.JSONEncodeError):
                # Nested deeper than the encoder allows (orjson reads 1024 levels, writes 255): the
                # item cannot be kept on its own, so the body is refused, and dead-lettered, whole.
                raise PayloadError("reading nested too deeply", ptr or "/") from None
            out.rejects.append(ItemReject(i, kept, exc))
            continue
        out._add(readings)
    return out


def _csv_rows(raw: bytes) -> tuple[list[str], list[list[str]], list[str]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"CSV must be UTF-8: {exc.reason} at byte {exc.start}") from None
    lines = text.splitlines()
    try:
        rows = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error as exc:
        raise PayloadError(f"malformed CSV: {exc}") from None
    if not rows or not rows[0]:
        raise PayloadError("CSV needs a header row")
    header = [h.strip() for h in rows[0]]
    if "ts" not in header:
        raise PayloadError("CSV header needs a ts column")
    if len(set(header)) != len(header):
        raise PayloadError("CSV header repeats a column")
    # Raw lines give the DLQ the row as it was sent (when rows are one line each, the usual case).
    return header, rows[1:], lines[1:] if len(lines) == len(rows) else [""] * (len(rows) - 1)


def _csv_item(
    header: list[str], row: list[str], i: int, tenant_id: str, device_id: str, ingest_ts: int, long: bool
) -> list[Reading]:
    ptr = f"/{i}"
    if len(row) != len(header):
        raise PayloadError(f"row has {len(row)} fields, header has {len(header)}", ptr)
    cells = dict(zip(header, row, strict=True))
    ts_text = cells["ts"].strip()
    ts = parse_timestamp(int(ts_text) if ts_text.isascii() and ts_text.isdigit() else ts_text, f"{ptr}/ts")
    quality = parse_quality(cells.get("quality") or None, f"{ptr}/quality")

    def number(text: str, pointer: str) -> float:
        try:
            value: Any = float(text)
        except ValueError:
            raise PayloadError(f"non-numeric value {text[:32]!r}", pointer) from None
        return parse_value(value, pointer)

    if long:
        metric = cells["metric"].strip()
        if not METRIC_RE.match(metric):
            raise PayloadError("metric names are 1-128 of A-Z a-z 0-9 _ . : / -", f"{ptr}/metric")
        return [Reading(tenant_id, device_id, metric, ts, number(cells["value"], f"{ptr}/value"), quality, ingest_ts)]
    readings = []
    for metric, text in cells.items():
        if metric in ("ts", "quality") or not text.strip():
            continue
        mptr = f"{ptr}/{escape_pointer(metric)}"
        if not METRIC_RE.match(metric):
            raise PayloadError("metric names are 1-128 of A-Z a-z 0-9 _ . : / -", mptr)
        readings.append(Reading(tenant_id, device_id, metric, ts, number(text, mptr), quality, ingest_ts))
    if not readings:
        raise PayloadError("row has no values", ptr)
    return readings


def parse_csv_batch(raw: bytes, tenant_id: str, device_id: str, ingest_ts: int) -> BatchOutcome:
    """Judge every row of a CSV batch (long or wide, see the module); PayloadError when it is not CSV."""
    header, rows, lines = _csv_rows(raw)
    long = "metric" in header and "value" in header
    out = BatchOutcome()
    for i, row in enumerate(rows):
        if not row:  # a blank line
            continue
        try:
            readings = _csv_item(header, row, i, tenant_id, device_id, ingest_ts, long)
        except PayloadError as exc:
            original = lines[i] if lines[i] else ",".join(row)
            out.rejects.append(ItemReject(i, (",".join(header) + "\n" + original).encode(), exc))
            continue
        out._add(readings)
    if out.items == 0:
        raise PayloadError("CSV has no data rows")
    return out
