"""Dependency shorthands: settings, database connections, and the calling tenant."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import psycopg
from fastapi import Depends, Request
from psycopg_pool import ConnectionPool

from sensormine.registry import resolve_api_key, visible_tenant_ids
from sensormine.settings import Settings
from serving.problems import Problem


def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_conn(request: Request) -> Iterator[psycopg.Connection]:
    """A pooled connection for the request."""
    pool: ConnectionPool = request.app.state.pool
    with pool.connection() as conn:
        yield conn


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ConnDep = Annotated[psycopg.Connection, Depends(get_conn)]


@dataclass(frozen=True)
class Caller:
    """Who is calling: their tenant, what they may read, and their scopes."""

    tenant_id: str
    visible: tuple[str, ...]
    scopes: tuple[str, ...]


def get_caller(request: Request, conn: ConnDep, settings: SettingsDep) -> Caller:
    """Authenticate the API key header; a missing or invalid key is a 401."""
    key = request.headers.get(settings.api_key_header)
    if not key:
        raise Problem(401, f"send an API key in the {settings.api_key_header} header")
    resolved = resolve_api_key(conn, key)
    if resolved is None:
        raise Problem(401, "the API key is unknown or revoked")
    tenant_id, scopes = resolved
    visible = tuple(visible_tenant_ids(conn, tenant_id))
    conn.commit()
    return Caller(tenant_id, visible, tuple(scopes))


CallerDep = Annotated[Caller, Depends(get_caller)]
