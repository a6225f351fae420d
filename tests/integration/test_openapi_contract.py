"""Schemathesis against the app's own OpenAPI document: no 500s, and every response matches its schema.

Runs through the real PostgreSQL (and Redis, when the launcher started it) with a tenant admin's
API key, over a tenant that has devices, a schema and points, so generated requests reach real code
paths rather than stopping at 404.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from sensormine.clients.hotstore import HotStoreWriter
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant, readings

pytestmark = pytest.mark.integration

# Routes whose generated calls would change the world outside the test's database.
EXCLUDED = {("POST", "/api/auth/logout")}
# Device ids the API refuses to register because fixed routes own the path (/api/devices/status, /import).
RESERVED_DEVICE_IDS = {"status", "import"}


@pytest.fixture
def admin_key(conn: psycopg.Connection) -> str:
    key = make_tenant(conn, "acme", ["press-1", "press-2"], plan="enterprise", role="tenant_admin")
    make_tenant(conn, "acme-east", ["pump-1"], parent_id="acme")
    HotStoreWriter(conn).write(readings("acme", "press-1", 20) + readings("acme-east", "pump-1", 5))
    conn.commit()
    return key


@pytest.fixture
def api_schema(settings: Settings, admin_key: str) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(settings)
    with TestClient(app):  # runs the lifespan: pool, limits
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hsettings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors_and_responses_match_the_schema(case: schemathesis.Case, admin_key: str) -> None:
    if (case.method.upper(), case.path) in EXCLUDED:
        pytest.skip("changes state shared by the other generated calls")
    if (case.path_parameters or {}).get("device_id") in RESERVED_DEVICE_IDS:
        return  # another route's path, not this one's: no device can have that id
    case.call_and_validate(
        headers={"X-API-Key": admin_key},
        checks=[not_a_server_error, response_schema_conformance],
    )
