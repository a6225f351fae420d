"""Schemathesis against the app's own OpenAPI document: no 500s, and every response matches its schema.

Runs through the real PostgreSQL (and Redis, when the launcher started it) with a tenant admin's
API key, over a tenant that has devices, a schema, a profile, a user, a spare key, points, an alarm
rule and an alarm. Two
generated cases in three get real path parameters (the fixture's ids), so they reach the handlers
instead of stopping at 404; `test_generated_calls_reached_the_handlers` then checks how many
routes answered 2xx at least once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from sensormine.alerts.channels import insert_channel, insert_policy, parse_policy
from sensormine.alerts.engine import Transition
from sensormine.alerts.rules import Rule, Scope, parse_condition
from sensormine.alerts.store import apply_transitions, insert_rule
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.devices.profiles import set_profile
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.users import create_user
from sensormine.schemas.store import register_schema
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import DAY_US, make_tenant, readings

pytestmark = pytest.mark.integration

# Routes whose generated calls would change the world outside the test's database.
EXCLUDED = {("POST", "/api/auth/logout")}
# Routes no generated call can pass: Stripe's signature over the body (tests/integration/test_billing_webhooks.py
# covers them); they still must answer without a 5xx and as documented, but do not count towards the 2xx share.
SIGNED = {("POST", "/api/billing/webhooks/stripe")}
# Device ids the API refuses to register because fixed routes own the path (/api/devices/status, /import).
RESERVED_DEVICE_IDS = {"status", "import"}


SCHEMA = {"type": "object", "properties": {"values": {"type": "object", "properties": {"t": {"type": "number"}}}}}
RULE = {"kind": "threshold", "metric": "t", "op": "gt", "value": 90}
MODBUS = {"protocol": "modbus", "host": "127.0.0.1", "points": [{"metric": "p", "address": 0, "data_type": "float32"}]}
REAL: dict[str, Any] = {}  # path parameter -> a real value of the fixture's world
REACHED: dict[tuple[str, str], set[int]] = {}  # (method, path) -> the status codes answered
_turn = itertools.count()


@pytest.fixture
def admin_key(conn: psycopg.Connection) -> str:
    key = make_tenant(conn, "acme", ["press-1", "press-2"], plan="enterprise", role="tenant_admin")
    make_tenant(conn, "acme-east", ["pump-1"], parent_id="acme")
    HotStoreWriter(conn).write(readings("acme", "press-1", 20) + readings("acme-east", "pump-1", 5))
    register_schema(conn, "acme", "press", SCHEMA)
    set_profile(conn, "acme", "press-2", MODBUS)
    user = create_user(conn, "acme", "viewer@acme.example", "a-long-password", "viewer")
    spare = create_api_key(conn, "acme", "spare", role="viewer")
    insert_channel(conn, "acme", "ops", "email", ["ops@acme.example"])
    insert_policy(conn, "acme", "on-call", "on-call", parse_policy([{"after_s": 0, "channels": ["ops"]}], None))
    rule = insert_rule(conn, Rule("acme", "overheat", "overheat", "major", parse_condition(RULE), Scope()))
    (raised,) = apply_transitions(conn, [Transition("raise", rule, "acme", "press-1", DAY_US, "t", 95.0)])
    conn.execute(
        "INSERT INTO tenant_payment_methods (stripe_payment_method_id, tenant_id, type, is_default) "
        "VALUES ('pm_contract', 'acme', 'card', true)"
    )
    conn.commit()
    REAL.update(
        payment_method_id="pm_contract",
        device_id="press-1",
        device_type="press",
        version=1,
        tenant_id="acme-east",
        user_id=user.id,
        key_id=spare.split("_")[1],
        rule_id="overheat",
        channel_id="ops",
        policy_id="on-call",
        alarm_id=raised.alarm.id,
    )
    return key


@pytest.fixture
def api_schema(settings: Settings, admin_key: str) -> Iterator[schemathesis.BaseSchema]:
    app = create_app(settings)
    with TestClient(app):  # runs the lifespan: pool, limits
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hsettings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors_and_responses_match_the_schema(case: schemathesis.Case, admin_key: str) -> None:
    if (case.method.upper(), case.path) in EXCLUDED:
        pytest.skip("changes state shared by the other generated calls")
    if (case.path_parameters or {}).get("device_id") in RESERVED_DEVICE_IDS:
        return  # another route's path, not this one's: no device can have that id
    if case.path_parameters and next(_turn) % 3:
        case.path_parameters = {k: REAL.get(k, v) for k, v in case.path_parameters.items()}
    response = case.call_and_validate(
        headers={"X-API-Key": admin_key},
        checks=[not_a_server_error, response_schema_conformance],
    )
    if case.method.upper() == case.operation.method.upper():  # not the coverage phase's unsupported methods
        REACHED.setdefault((case.method.upper(), case.path), set()).add(response.status_code)


def test_generated_calls_reached_the_handlers() -> None:
    """Most routes must have answered 2xx at least once: a contract test of 404s would prove little."""
    if not REACHED:
        pytest.skip("runs after the generated calls (run the whole module)")
    reached = {op: codes for op, codes in REACHED.items() if op not in SIGNED}
    ok = sorted(op for op, codes in reached.items() if any(200 <= c < 300 for c in codes))
    never = sorted(set(reached) - set(ok))
    print(f"{len(ok)} of {len(reached)} routes answered 2xx at least once; never: {never}")
    assert len(ok) >= 0.75 * len(reached), f"only {len(ok)} of {len(reached)} routes reached a 2xx; never: {never}"
