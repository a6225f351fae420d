"""Prometheus metrics at /metrics: requests by route template, method and status, their latency, pool use;
and the egress meter (usage resource data_egress: response bytes per tenant, docs/billing.md).

A plain ASGI middleware (no BaseHTTPMiddleware), so the cost per request is a dict lookup and two
metric updates. Labels use the route template (`/api/devices/{device_id}`), never the raw path, so
the number of series stays bounded.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sensormine.metering.usage_events import DATA_EGRESS, ByteMeter, usage_event_sink
from sensormine.settings import Settings
from serving.limits import metering_connection
from serving.problems import Problem


class Metrics:
    """The app's own registry (one per app, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sensormine_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sensormine_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.pool_size = Gauge("sensormine_db_pool_connections", "Database pool connections", registry=self.registry)
        self.pool_waiting = Gauge(
            "sensormine_db_pool_waiting", "Requests waiting for a connection", registry=self.registry
        )
        self.egress: ByteMeter | None = None  # response bytes per tenant, set by start_egress


class MetricsMiddleware:
    """Counts and times every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        sent = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            key = (scope["method"], template, status)
            series = self._series.get(key)
            if series is None:  # labels() takes a lock and builds a key: once per series, not per request
                series = self._series[key] = (
                    self.metrics.requests.labels(scope["method"], template, str(status)),
                    self.metrics.latency.labels(scope["method"], template),
                )
            series[0].inc()
            series[1].observe(time.perf_counter() - start)
            # Egress: the body bytes sent to an authenticated tenant's caller (serving.deps.authenticate
            # puts the caller in the request's state).
            caller = scope.get("state", {}).get("caller")
            egress = self.metrics.egress
            if caller is not None and caller.tenant_id is not None and egress is not None:
                egress.count(caller.tenant_id, sent)


METRICS_TOKEN_FILE = "metrics-token"


def metrics_token(settings: Settings) -> str | None:
    """The scrape token: SENSORMINE_METRICS_TOKEN, a generated one in development, else None (metrics off)."""
    if settings.metrics_token:
        return settings.metrics_token
    if settings.is_development:
        return settings.generated_secret(
            METRICS_TOKEN_FILE, what="scraping /metrics", variable="SENSORMINE_METRICS_TOKEN"
        )
    return None


def _authorise_scrape(request: Request) -> None:
    """/metrics answers only a scraper sending the metrics token as a bearer token."""
    token = metrics_token(request.app.state.settings)
    if token is None:
        raise Problem(404, "metrics are off: set SENSORMINE_METRICS_TOKEN and scrape with it as a bearer token")
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(sent.strip().encode(), token.encode()):
        raise Problem(
            401,
            "send the metrics token as 'Authorization: Bearer <token>' (SENSORMINE_METRICS_TOKEN, or in "
            f"development {{state_dir}}/{METRICS_TOKEN_FILE})",
            headers={"WWW-Authenticate": "Bearer"},
        )


def start_egress(app: FastAPI, settings: Settings) -> None:
    """Meter response bytes per tenant (with the other limits: off when `limits_enabled` is)."""
    if not settings.limits_enabled:
        return
    sink = usage_event_sink(settings, lambda: metering_connection(app))
    meter = ByteMeter(DATA_EGRESS, "api", sink, settings.egress_flush_interval_s)
    meter.start()
    app.state.metrics.egress = meter


def stop_egress(app: FastAPI) -> None:
    """Emit the last egress counts (before the pool closes)."""
    metrics: Metrics = app.state.metrics
    meter, metrics.egress = metrics.egress, None
    if meter is not None:
        meter.close()


def install_metrics(app: FastAPI) -> None:
    """Add the middleware and the /metrics route (bearer token: see `metrics_token`)."""
    metrics = Metrics()
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request) -> Response:
        _authorise_scrape(request)
        pool = getattr(request.app.state, "pool", None)
        if pool is not None:
            stats = pool.get_stats()
            metrics.pool_size.set(stats.get("pool_size", 0))
            metrics.pool_waiting.set(stats.get("requests_waiting", 0))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
