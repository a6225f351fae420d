"""Tenant events (quota warnings and the like), recorded once per dedupe key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg


def record_tenant_event(
    conn: psycopg.Connection, tenant_id: str, event_type: str, data: dict[str, Any], dedupe_key: str | None = None
) -> bool:
    """Record a tenant event (in the caller's transaction); with `dedupe_key`, only once. True if recorded."""
    row = conn.execute(
        "SELECT sensormine_record_tenant_event(%s, %s, %s::jsonb, %s)",
        (tenant_id, event_type, json.dumps(data), dedupe_key),
    ).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class TenantEvent:
    """Something that happened to a tenant (e.g. quota.api_calls.warning at 80 %)."""

    id: int
    at: datetime
    tenant_id: str
    type: str
    data: dict[str, Any]


def tenant_events(conn: psycopg.Connection, tenant_id: str, before_id: int | None, limit: int) -> list[TenantEvent]:
    """A tenant's events, newest first, older than `before_id` when given."""
    rows = conn.execute(
        "SELECT id, at, tenant_id, type, data FROM tenant_events WHERE tenant_id = %s "
        "AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s",
        (tenant_id, before_id, before_id, limit),
    ).fetchall()
    return [TenantEvent(*r) for r in rows]
