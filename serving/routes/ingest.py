"""HTTP batch ingest for devices that push: `POST /api/ingest` with the device's key."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from sensormine.alerts.processor import watched_sink
from sensormine.clients.postgres import AUTH, INGEST, connect, role_scope
from sensormine.devices.registry import device_key_holder
from sensormine.devices.status import TrackingSink, tracked
from sensormine.limits.storage import StorageGate
from sensormine.reading import now_us
from sensormine.settings import Settings
from sensormine.telemetry.batch import BatchOutcome, parse_csv_batch, parse_json_batch
from sensormine.telemetry.payload import PayloadError
from serving.bodies import read_limited
from serving.deps import SettingsDep
from serving.limits import ingest_rate_guard
from serving.problems import Problem

router = APIRouter(prefix="/api", tags=["ingest"])
SOURCE = "http"
MAX_ERRORS_LISTED = 100


class ItemError(BaseModel):
    """Why one item of the batch was rejected (it is in the dead-letter queue)."""

    index: int = Field(description="Position of the item: array index, or data row (0 = first row after the header).")
    reason: str
    pointer: str = Field(description="JSON pointer into the batch (CSV: /<row>/<column>).")


class IngestResult(BaseModel):
    """What happened to the batch: every item is either accepted or in the dead-letter queue."""

    tenant_id: str
    device_id: str
    items: int
    accepted_items: int
    rejected_items: int
    readings: int = Field(description="Readings of the accepted items, now durable.")
    errors: list[ItemError] = Field(description=f"The first {MAX_ERRORS_LISTED} rejected items.")


class IngestGate:
    """The app's one sink for HTTP ingest (device status counted), created on first use, one request at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sink: TrackingSink | None = None
        self._lock = threading.Lock()
        # A batch of a quota group that stores its plan's limit is refused before it is read.
        self.storage = StorageGate(lambda: connect(settings, role=INGEST), settings.storage_quota_recheck_s)

    def _open(self) -> TrackingSink:
        # Called with the lock held.
        if self._sink is None:
            self._sink = tracked(watched_sink(self.settings), self.settings)
        return self._sink

    def deliver(self, tenant_id: str, device_id: str, outcome: BatchOutcome) -> None:
        """Hand the batch's readings and rejects over and wait until they are durable; 503 when they are not."""
        with self._lock:
            sink = self._open()
            origin = f"http:{tenant_id}/{device_id}"
            if outcome.readings:
                sink.publish(tenant_id, device_id, SOURCE, outcome.readings)
            for r in outcome.rejects:
                sink.reject(SOURCE, f"{origin}#{r.index}", str(r.error), r.payload, tenant_id, device_id)
            pending = sink.flush(self.settings.http_ingest_timeout_s)
        if pending:
            raise Problem(
                503,
                f"{pending} message(s) not confirmed durable within {self.settings.http_ingest_timeout_s} s; "
                "retry the same batch (readings are deduplicated by device, metric and timestamp)",
            )

    def reject_whole(self, tenant_id: str, device_id: str, body: bytes, error: PayloadError) -> None:
        """A body that is not a batch at all goes to the dead-letter queue whole."""
        with self._lock:
            sink = self._open()
            sink.reject(SOURCE, f"http:{tenant_id}/{device_id}", str(error), body, tenant_id, device_id)
            sink.flush(self.settings.http_ingest_timeout_s)

    def close(self) -> None:
        """Flush and release the sink, writing the last device-status counts (at shutdown)."""
        with self._lock:
            if self._sink is not None:
                self._sink.flush(self.settings.http_ingest_timeout_s)
                self._sink.close()
                self._sink = None
        self.storage.close()


def _gate(request: Request, settings: Settings) -> IngestGate:
    gate: IngestGate | None = getattr(request.app.state, "ingest_gate", None)
    if gate is None:
        gate = request.app.state.ingest_gate = IngestGate(settings)
    return gate


def _device(request: Request, gate: IngestGate, key: str) -> tuple[str, str] | None:
    """The device holding `key`, once its tenant's ingest rate admits the request (else a 429 problem)
    and its storage quota has room (else a 403 problem)."""
    with request.app.state.pool.connection() as conn, role_scope(conn, AUTH):
        holder = device_key_holder(conn, key)
    if holder is None:
        return None
    ingest_rate_guard(request.app, holder.quota_tenant, holder.plan)
    refusal = gate.storage.refusal(holder.tenant_id)
    if refusal is not None:
        raise Problem(
            403,
            f"{refusal}; nothing of this batch was stored: send it again once the plan allows",
            "Storage quota exceeded",
            kind="storage",
        )
    return holder.tenant_id, holder.device_id


@router.post(
    "/ingest",
    response_model=IngestResult,
    summary="Push a batch of readings (JSON or CSV) with a device key",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"type": ["object", "array"]},
                    "example": [{"ts": "2026-11-26T10:00:00Z", "values": {"temperature": 21.5}}],
                },
                "text/csv": {"schema": {"type": "string"}, "example": "ts,temperature\\n2026-11-26T10:00:00Z,21.5\\n"},
            },
        }
    },
    responses={
        400: {"description": "The body is not a JSON or CSV batch (it is in the dead-letter queue)."},
        401: {"description": "Missing or unknown device key."},
        403: {"description": "The tenant stores its plan's storage limit or more: upgrade the plan (nothing stored)."},
        413: {"description": "Body larger than SENSORMINE_HTTP_INGEST_MAX_BYTES."},
        429: {"description": "The tenant's plan allows no more ingest requests a second (Retry-After)."},
        415: {"description": "Content type other than application/json or text/csv."},
        503: {"description": "Not confirmed durable in time; retry."},
    },
)
async def ingest(
    request: Request,
    settings: SettingsDep,
    content_type: Annotated[str, Header()] = "application/json",
) -> IngestResult:
    """Accept or reject every item of the batch; rejected items go to the dead-letter queue with their reason.

    JSON: the MQTT payload contract (an object or an array of `{"ts", "values", "quality"?}`).
    CSV: header `ts,<metric>,...` (one row per timestamp) or `ts,metric,value[,quality]`.
    The answer comes once the accepted readings are durable (in Kafka, or in the hot store).
    """
    key = request.headers.get(settings.device_key_header)
    if not key:
        raise Problem(401, f"send the device key in the {settings.device_key_header} header")
    gate = _gate(request, settings)
    device = await run_in_threadpool(_device, request, gate, key)
    if device is None:
        raise Problem(401, "the device key is unknown (revoked, or the device was deleted)")
    tenant_id, device_id = device
    limit = settings.http_ingest_max_bytes
    body = await read_limited(request, limit, f"body larger than {limit} bytes: split the batch")
    media = content_type.split(";", 1)[0].strip().lower()
    parsers = {"application/json": parse_json_batch, "text/csv": parse_csv_batch}
    if media not in parsers:
        raise Problem(415, f"content type {media!r} is not accepted: send application/json or text/csv")
    try:
        outcome = parsers[media](body, tenant_id, device_id, now_us())
    except PayloadError as exc:
        await run_in_threadpool(gate.reject_whole, tenant_id, device_id, body, exc)
        raise Problem(400, f"not a {media} batch: {exc}; the body was kept in the dead-letter queue") from None
    await run_in_threadpool(gate.deliver, tenant_id, device_id, outcome)
    return IngestResult(
        tenant_id=tenant_id,
        device_id=device_id,
        items=outcome.items,
        accepted_items=outcome.accepted_items,
        rejected_items=len(outcome.rejects),
        readings=len(outcome.readings),
        errors=[
            ItemError(index=r.index, reason=r.error.reason, pointer=r.error.pointer)
            for r in outcome.rejects[:MAX_ERRORS_LISTED]
        ],
    )
