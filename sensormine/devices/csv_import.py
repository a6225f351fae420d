"""Parsing a CSV of devices for bulk registration (checked row by row before anything is written)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import orjson

from sensormine.devices.registry import check_device_id, check_device_name, check_device_type, check_metadata
from sensormine.tenancy.tenants import RegistryError

MAX_IMPORT_ROWS = 1000


IMPORT_COLUMNS = ("id", "name", "device_type", "metadata")


@dataclass
class DeviceRow:
    """One device row of an import file; `error` says why it cannot be registered (None when it can)."""

    line: int  # line of the file where the row ends (the header is line 1)
    device_id: str
    name: str | None = None
    device_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def parse_device_csv(raw: bytes, max_rows: int = MAX_IMPORT_ROWS) -> list[DeviceRow]:
    """The rows of a device import file: CSV (UTF-8) with a header naming `id` and optionally `name`,
    `device_type`, `metadata` (a JSON object, quoted as a CSV field), in any order.

    Each row is judged on its own (`DeviceRow.error`): a bad id, name, type or metadata, or an id
    repeated in the file. A file that is unusable as a whole (not UTF-8 text, no header, an unknown
    or missing column, more than `max_rows` rows) raises RegistryError. Blank lines are skipped.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"the file is not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((r for r in reader if any(c.strip() for c in r)), None)
        if header is None:
            raise RegistryError("the file is empty: its first line must name the columns, e.g. id,name,device_type")
        columns = [c.strip().lower() for c in header]
        unknown = [c for c in columns if c not in IMPORT_COLUMNS]
        if unknown or "id" not in columns or len(set(columns)) != len(columns):
            raise RegistryError(
                "the header must name the columns id[,name][,device_type][,metadata] once each, got "
                + ",".join(columns)
            )
        rows: list[DeviceRow] = []
        seen: dict[str, int] = {}
        for fields in reader:
            if not any(c.strip() for c in fields):
                continue
            if len(rows) >= max_rows:
                raise RegistryError(f"more than {max_rows} devices in one import: split the file")
            rows.append(_device_row(reader.line_num, columns, fields, seen))
    except csv.Error as exc:
        raise RegistryError(f"the file is not valid CSV at line {reader.line_num}: {exc}") from None
    return rows


def _device_row(line: int, columns: list[str], fields: list[str], seen: dict[str, int]) -> DeviceRow:
    values = dict(zip(columns, (f.strip() for f in fields), strict=False))
    row = DeviceRow(line, values.get("id", ""))
    if len(fields) != len(columns):
        row.error = (
            f"{len(fields)} fields where the header names {len(columns)}; "
            'quote fields holding commas (metadata JSON as "{""site"": ""north""}")'
        )
        return row
    row.name = values.get("name") or None
    row.device_type = values.get("device_type") or None
    try:
        check_device_id(row.device_id)
        check_device_name(row.name)
        check_device_type(row.device_type)
        if values.get("metadata"):
            try:
                metadata = orjson.loads(values["metadata"])
            except orjson.JSONDecodeError as exc:
                raise RegistryError(f"metadata is not JSON: {exc}") from None
            row.metadata = check_metadata(metadata)
    except RegistryError as exc:
        row.error = str(exc)
        return row
    if row.device_id in seen:
        row.error = f"device id {row.device_id!r} is also on line {seen[row.device_id]} of the file"
    else:
        seen[row.device_id] = line
    return row
