"""Device payload parsing and normalisation into Readings, and the Kafka envelope.

Device payloads are JSON: `{"ts": <ISO-8601 or epoch ms>, "values": {"<metric>": <number>}}`
or a JSON array of such objects. A payload is accepted whole or rejected whole with a
reason; rejected bytes go to the dead-letter queue unchanged.
"""

from __future__ import annotations

import math
import re
import struct
from datetime import datetime
from typing import Any

import orjson

from sensormine.clients.hotstore import CopyBatch
from sensormine.reading import QUALITY_BAD, QUALITY_GOOD, QUALITY_UNCERTAIN, US_PER_DAY, Reading, datetime_to_us

MAX_PAYLOAD_BYTES = 1 << 20
MAX_READINGS_PER_PAYLOAD = 10_000
MAX_METRIC_LEN = 128
METRIC_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
# Epoch values below this are taken as seconds by nobody: the contract says milliseconds.
_MIN_US = datetime_to_us(datetime.fromisoformat("2000-01-01T00:00:00+00:00"))
_MAX_US = datetime_to_us(datetime.fromisoformat("2100-01-01T00:00:00+00:00"))
_QUALITY_NAMES = {"good": QUALITY_GOOD, "uncertain": QUALITY_UNCERTAIN, "bad": QUALITY_BAD}


class PayloadError(ValueError):
    """A payload that cannot become readings; `reason` is what goes to the dead-letter queue."""

    def __init__(self, reason: str, pointer: str = "") -> None:
        super().__init__(f"{reason} at {pointer}" if pointer else reason)
        self.reason = reason
        self.pointer = pointer

    def __str__(self) -> str:  # the DLQ reason, pointer included
        return f"{self.reason} (at {self.pointer})" if self.pointer else self.reason


def parse_timestamp(raw: Any, pointer: str = "/ts") -> int:
    """Epoch microseconds from an ISO-8601 string (zone required, or taken as UTC) or epoch milliseconds."""
    if isinstance(raw, bool):
        raise PayloadError("timestamp must be ISO-8601 or epoch milliseconds", pointer)
    if isinstance(raw, int | float):
        if not math.isfinite(raw):
            raise PayloadError("timestamp is not finite", pointer)
        scaled = raw * 1000
        if isinstance(scaled, float) and not math.isfinite(scaled):  # e.g. 2e305 ms overflows
            raise PayloadError("timestamp outside 2000-01-01..2100-01-01", pointer)
        us = round(scaled)
    elif isinstance(raw, str):
        text = raw.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            us = datetime_to_us(datetime.fromisoformat(text))
        except (ValueError, OverflowError):
            raise PayloadError(f"unparseable timestamp {raw[:64]!r}", pointer) from None
    else:
        raise PayloadError("timestamp must be ISO-8601 or epoch milliseconds", pointer)
    if not _MIN_US <= us < _MAX_US:
        raise PayloadError("timestamp outside 2000-01-01..2100-01-01", pointer)
    return us


def parse_value(raw: Any, pointer: str) -> float:
    """A finite float from a JSON number or boolean; anything else is rejected."""
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:
            raise PayloadError("number too large for float64", pointer) from None
        if not math.isfinite(value):
            raise PayloadError("value is not finite", pointer)
        return value
    raise PayloadError(f"non-numeric value of type {type(raw).__name__}", pointer)


def parse_quality(raw: Any, pointer: str) -> int:
    if raw is None:
        return QUALITY_GOOD
    if isinstance(raw, str) and raw.lower() in _QUALITY_NAMES:
        return _QUALITY_NAMES[raw.lower()]
    if isinstance(raw, int) and not isinstance(raw, bool) and raw in (0, 1, 2):
        return raw
    raise PayloadError("quality must be good, uncertain, bad or 0..2", pointer)


def _decode(raw: bytes) -> Any:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None


def parse_reading_item(item: Any, ptr: str, tenant_id: str, device_id: str, ingest_ts: int) -> list[Reading]:
    """The readings of one `{"ts", "values", "quality"?}` object; `ptr` is its JSON pointer."""
    if not isinstance(item, dict):
        raise PayloadError("reading must be a JSON object", ptr or "/")
    if "ts" not in item:
        raise PayloadError("missing ts", ptr or "/")
    ts = parse_timestamp(item["ts"], f"{ptr}/ts")
    values = item.get("values")
    if not isinstance(values, dict) or not values:
        raise PayloadError("values must be a non-empty object", f"{ptr}/values")
    quality = parse_quality(item.get("quality"), f"{ptr}/quality")
    readings = []
    for metric, raw_value in values.items():
        # The pointer is only built for an error: this loop runs for every reading on the hot path.
        if not METRIC_RE.match(metric):
            raise PayloadError(
                "metric names are 1-128 of A-Z a-z 0-9 _ . : / -", f"{ptr}/values/{escape_pointer(metric)}"
            )
        try:
            value = parse_value(raw_value, "")
        except PayloadError as exc:
            raise PayloadError(exc.reason, f"{ptr}/values/{escape_pointer(metric)}") from None
        readings.append(Reading(tenant_id, device_id, metric, ts, value, quality, ingest_ts))
    return readings


def payload_items(doc: Any) -> tuple[list[Any], str]:
    """The reading objects of a decoded payload and the pointer pattern of their positions."""
    if isinstance(doc, dict):
        return [doc], ""
    if isinstance(doc, list):
        if not doc:
            raise PayloadError("empty array")
        return doc, "/{}"
    raise PayloadError("payload must be a JSON object or array of objects")


def parse_device_payload(raw: bytes, tenant_id: str, device_id: str, ingest_ts: int) -> list[Reading]:
    """Normalise one device payload into readings, or raise PayloadError."""
    items, base = payload_items(_decode(raw))
    readings: list[Reading] = []
    for i, item in enumerate(items):
        readings.extend(parse_reading_item(item, base.format(i) if base else "", tenant_id, device_id, ingest_ts))
        if len(readings) > MAX_READINGS_PER_PAYLOAD:
            raise PayloadError(f"more than {MAX_READINGS_PER_PAYLOAD} readings in one payload")
    return readings


def escape_pointer(token: str) -> str:
    """JSON-pointer escaping of one reference token (RFC 6901)."""
    return token[:MAX_METRIC_LEN].replace("~", "~0").replace("/", "~1")


# --- Kafka envelope: normalised readings of one device, as produced by every daemon ---

ENVELOPE_VERSION = 1


def encode_envelope(tenant_id: str, device_id: str, source: str, readings: list[Reading]) -> bytes:
    """Serialise one device's normalised readings for the telemetry topic."""
    ingest_ts = readings[0].ingest_ts if readings else 0
    return orjson.dumps(
        {
            "v": ENVELOPE_VERSION,
            "tenant_id": tenant_id,
            "device_id": device_id,
            "source": source,
            "ingest_ts": ingest_ts,
            "points": [[r.metric, r.ts, r.value, r.quality] for r in readings],
        }
    )


def decode_envelope(raw: bytes) -> list[Reading]:
    """Readings from a telemetry-topic message; raises PayloadError when it is not a valid envelope."""
    try:
        doc = orjson.loads(raw)
        if doc.get("v") != ENVELOPE_VERSION:
            raise PayloadError(f"unsupported envelope version {doc.get('v')!r}", "/v")
        tenant_id, device_id, ingest_ts = doc["tenant_id"], doc["device_id"], doc["ingest_ts"]
        return [Reading(tenant_id, device_id, m, ts, float(v), q, ingest_ts) for m, ts, v, q in doc["points"]]
    except PayloadError:
        raise
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed envelope: {exc}") from None


_pack_tail = CopyBatch.pack_tail
PG_EPOCH_US = CopyBatch.PG_EPOCH_US


def decode_envelope_into(raw: bytes, batch: CopyBatch, ts_limit_us: int) -> int | None:
    """Fast path: add a telemetry-topic message's readings to `batch` as binary COPY rows, without Reading objects.

    Returns how many readings were added, or None, leaving `batch` untouched, whenever the message is
    anything but a plain valid envelope with every timestamp at or before `ts_limit_us` (malformed, an
    unexpected type, empty, from the future). Callers then take the reference path, `decode_envelope` +
    `validate_message`, which decides and explains; so both paths accept and reject exactly the same messages.
    """
    try:
        doc = orjson.loads(raw)
        tenant_id, device_id, ingest_ts, points = doc["tenant_id"], doc["device_id"], doc["ingest_ts"], doc["points"]
        if (
            doc["v"] != ENVELOPE_VERSION
            or type(tenant_id) is not str
            or type(device_id) is not str
            or type(ingest_ts) is not int
            or type(points) is not list
            or not points
        ):
            return None
        ingest_pg = ingest_ts - PG_EPOCH_US
        lo = hi = points[0][1]
        tails = []
        for metric, ts, value, quality in points:
            # Exact types: the reference path would coerce a numeric string value, reject a float ts, etc.
            if type(metric) is not str or type(ts) is not int:
                return None
            if ts > hi:
                hi = ts
            elif ts < lo:
                lo = ts
            tails.append(_pack_tail(ts - PG_EPOCH_US, 8, value, 2, quality, 8, ingest_pg))
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, struct.error):
        return None
    if hi > ts_limit_us:
        return None
    # Only now touch the batch: a message goes in whole or not at all.
    day = lo // US_PER_DAY
    if day == hi // US_PER_DAY:
        buckets = batch.device(day, tenant_id, device_id)
        for point, tail in zip(points, tails, strict=True):
            rows = buckets.get(point[0])
            if rows is None:
                buckets[point[0]] = [tail]
            else:
                rows.append(tail)
    else:  # readings on both sides of a UTC midnight
        for point, tail in zip(points, tails, strict=True):
            buckets = batch.device(point[1] // US_PER_DAY, tenant_id, device_id)
            buckets.setdefault(point[0], []).append(tail)
    batch.rows += len(tails)
    return len(tails)
