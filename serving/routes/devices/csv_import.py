"""Bulk registration from a CSV file (`POST /api/devices/import`), as text/csv or a multipart upload."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from sensormine.devices import usecases
from sensormine.devices.csv_import import MAX_IMPORT_ROWS, DeviceRow, parse_device_csv
from sensormine.devices.registry import BrokerUpdate, RegistryError
from sensormine.devices.usecases import DeviceImport, ImportMode, ImportRefused
from sensormine.limits.devices import QuotaExceeded
from sensormine.settings import Settings
from serving.bodies import read_limited
from serving.deps import Caller, ConnDep, SettingsDep
from serving.limits import too_many
from serving.problems import Problem
from serving.routes.devices.common import BrokerState, TenantParam, Writer, broker

router = APIRouter(prefix="/api/devices", tags=["devices"])

MAX_IMPORT_BYTES = 1 << 20


class ImportRowOut(BaseModel):
    """The verdict on one row of an import file."""

    line: int = Field(description="Line of the file where the row ends (the header is line 1)")
    id: str
    status: Literal["accepted", "rejected", "valid"] = Field(
        description="accepted: registered; rejected: see reason; valid: good, but an all_or_nothing import was refused"
    )
    reason: str | None = None
    device_key: str | None = Field(None, description="Shown once, for accepted rows")
    broker: BrokerState | None = None


class ImportOut(BaseModel):
    """What an import did: every row accepted (registered, with its key) or rejected (with the reason)."""

    tenant_id: str
    mode: Literal["per_row", "all_or_nothing"]
    rows: int
    accepted: int
    rejected: int
    results: list[ImportRowOut]


@router.post(
    "/import",
    response_model=ImportOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": 'id,name,device_type,metadata\npress-1,Press 1,press,"{""site"": ""north""}"\n',
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            },
        }
    },
    responses={
        413: {"description": f"More than {MAX_IMPORT_BYTES} bytes or {MAX_IMPORT_ROWS} rows: split the file"},
        415: {"description": "Neither text/csv nor multipart/form-data"},
        422: {"description": "Not a usable CSV file; or, all_or_nothing, a row was rejected (nothing registered)"},
        429: {"description": "The devices would exceed the plan's device quota (nothing registered)"},
    },
)
async def import_devices(
    request: Request,
    caller: Writer,
    conn: ConnDep,
    settings: SettingsDep,
    tenant_id: TenantParam = None,
    mode: Annotated[
        ImportMode,
        Query(description="per_row: register every good row; all_or_nothing: register none if any row is rejected"),
    ] = "per_row",
) -> ImportOut:
    """Register devices from a CSV file: header `id[,name][,device_type][,metadata]`, one device per row.

    `metadata` is a JSON object in a quoted CSV field (`"{""site"": ""north""}"`). Send the file as
    the `text/csv` body or as the `file` part of a `multipart/form-data` upload. Each row is accepted
    (registered: its key is in the answer, this once) or rejected with the reason (bad field, id repeated
    in the file, id already registered). The device quota is checked for all the rows at once: if they
    do not fit, nothing is registered (429). At most 1 MiB and 1000 rows per file.
    """
    tenant = caller.tenant(tenant_id)
    raw = await _import_body(request)
    try:
        rows = parse_device_csv(raw)
    except RegistryError as exc:
        status = 413 if "split the file" in str(exc) else 422
        raise Problem(status, str(exc)) from None
    return await run_in_threadpool(_import, caller, conn, settings, tenant, rows, mode)


def _import(
    caller: Caller, conn: psycopg.Connection, settings: Settings, tenant: str, rows: list[DeviceRow], mode: ImportMode
) -> ImportOut:
    try:
        done = usecases.import_devices(conn, caller, tenant, rows, mode, broker=broker(settings))
    except ImportRefused as exc:
        raise Problem(422, str(exc), results=[_row_out(r, None, None).model_dump() for r in exc.rows]) from None
    except QuotaExceeded as exc:
        raise too_many(exc) from None
    return _answer(tenant, mode, done)


def _answer(tenant: str, mode: ImportMode, done: DeviceImport) -> ImportOut:
    keys = done.keys
    results = [_row_out(r, keys.get(r.device_id) if r.error is None else None, done.broker) for r in done.rows]
    return ImportOut(
        tenant_id=tenant,
        mode=mode,
        rows=len(done.rows),
        accepted=len(keys),
        rejected=len(done.rows) - len(keys),
        results=results,
    )


def _row_out(row: DeviceRow, key: str | None, states: dict[str, BrokerUpdate] | None) -> ImportRowOut:
    if row.error is None and key is None:  # a good row of an all-or-nothing import that was refused
        return ImportRowOut(line=row.line, id=row.device_id, status="valid")
    if row.error is not None or key is None:
        return ImportRowOut(line=row.line, id=row.device_id, status="rejected", reason=row.error)
    state = (states or {}).get(row.device_id)
    return ImportRowOut(
        line=row.line, id=row.device_id, status="accepted", device_key=key, broker=state.value if state else None
    )


async def _import_body(request: Request) -> bytes:
    """The CSV bytes of an import request: the body itself, or the first file part of a multipart form."""
    too_big = f"the import is larger than {MAX_IMPORT_BYTES} bytes: split the file"
    body = await read_limited(request, MAX_IMPORT_BYTES + 64 * 1024, too_big)  # room for multipart framing
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media in ("text/csv", "text/plain", "application/csv"):
        data = body
    elif media == "multipart/form-data":
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=10)
        upload = form.get("file") or next((v for v in form.values() if not isinstance(v, str)), None)
        if upload is None or isinstance(upload, str):
            raise Problem(422, "the multipart form has no file: send the CSV as the part named 'file'")
        data = await upload.read()
    else:
        raise Problem(415, f"content type {media or 'none'!r} is not accepted: send text/csv, or multipart/form-data")
    if len(data) > MAX_IMPORT_BYTES:
        raise Problem(413, too_big)
    return data
