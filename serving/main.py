"""Builds the FastAPI app: routers, problem+json errors, and the connection pool's lifetime."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from sensormine.clients.latest import LatestCache, LatestListener
from sensormine.clients.postgres import METERING, connect, make_pool, migrate_database
from sensormine.identity.tokens import jwt_secret
from sensormine.metering.notices import NoticeMailer
from sensormine.settings import Settings, get_settings
from serving.deps import CredentialCache, document_api_keys
from serving.limits import start_limits, stop_limits
from serving.metrics import install_metrics, start_egress, stop_egress
from serving.problems import install_problem_handlers
from serving.routes import (
    alerts,
    audit,
    auth,
    billing,
    devices,
    dlq,
    health,
    ingest,
    query,
    schemas,
    tenants,
    usage,
    users,
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application for `settings` (the environment's by default)."""
    settings = settings or get_settings()
    jwt_secret(settings)  # refuse to start outside development without a real signing secret

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate_database(settings)
        app.state.pool = make_pool(settings)
        start_limits(app, settings)
        start_egress(app, settings)
        mailer = None
        if settings.smtp_url:
            mailer = NoticeMailer(
                lambda: connect(settings, role=METERING), settings.smtp_url, settings.smtp_from,
                settings.notice_mail_interval_s,
            )  # fmt: skip
            mailer.start()
        listener = None
        if settings.latest_push:
            app.state.latest_cache = LatestCache()
            listener = LatestListener(lambda: connect(settings), app.state.latest_cache)
            listener.start()
        # Everything allocated so far lives as long as the process: keep the collector from scanning it
        # again on every collection of the oldest generation (measured in docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # an app built and stopped inside a longer-lived process (tests) leaves nothing pinned
            if listener is not None:
                listener.close()
            if mailer is not None:
                mailer.close()
            stop_egress(app)
            stop_limits(app)  # a last flush of API-call counts
            gate = getattr(app.state, "ingest_gate", None)
            if gate is not None:
                gate.close()
            app.state.pool.close()

    app = FastAPI(
        title="Sensormine API",
        version="0.1.0",
        description="Industrial-IoT telemetry: devices, schemas and one time-series query over hot store and lake.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.credentials = CredentialCache(settings.auth_cache_ttl_s)
    install_problem_handlers(app)
    install_metrics(app)
    app.include_router(query.latest_router)  # first: the busiest route matches soonest
    app.include_router(query.router)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(ingest.router)
    app.include_router(dlq.router)
    for router in devices.routers:
        app.include_router(router)
    app.include_router(schemas.router)
    app.include_router(tenants.router)
    app.include_router(users.router)
    app.include_router(audit.router)
    app.include_router(usage.router)
    app.include_router(alerts.router)
    app.include_router(billing.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_api_keys(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app() -> FastAPI:
    """Factory for `uvicorn --factory serving.main:app`."""
    return create_app()
