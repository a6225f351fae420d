"""The isolation matrix: every API route, with every role, aimed at a parent, a sibling and a child tenant.

The caller always belongs to `child` (under `parent`, beside `sibling`, above `grandchild`):

- aimed at `parent` or `sibling`, nothing may succeed: 404 (the tenant or object is "not found"),
  or 403 when the role lacks the permission anyway; and afterwards their rows are exactly as before;
- aimed at `grandchild` (its own sub-tenant), a route succeeds exactly when the role holds the
  route's permission (2xx), and is refused with 403 otherwise.

Snapshots before and after cover tenants, devices, users, keys, schemas, profiles, telemetry, dead
letters and their replays, the audit log, usage, tenant events, alarm rules, alarms and their
history, channels, policies, SMS gateways, subscriptions, Stripe customers, invoices and
payment states; the DLQ replay and the subscription (at stripe-mock) are real.
`test_callers_elsewhere_in_the_tree_reach_nothing_outside_their_subtree` takes the other directions
(a grandchild upwards, a sibling across, a parent into another top-level tenant), and
`test_ingest_and_auth_routes_stay_inside_the_callers_tenant` the routes outside the tenant matrix
(device keys, log in, me, log out).

The route list comes from the app's OpenAPI document, so a new route without a case here fails
`test_every_route_is_in_the_matrix`. The permission each route needs is written here by hand
(PERMISSIONS), not taken from the app: a route that declares the wrong one fails
`test_every_route_declares_the_permission_written_here` and the matrix.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.alerts.channels import insert_channel, insert_policy, parse_policy, set_sms_provider
from sensormine.alerts.engine import Transition
from sensormine.alerts.rules import Rule, Scope, parse_condition
from sensormine.alerts.store import apply_transitions, insert_rule
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.devices.profiles import set_profile
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.roles import ROLE_PERMISSIONS, Role
from sensormine.identity.users import create_user
from sensormine.ingest.sinks import store_dead_letter
from sensormine.schemas.store import register_schema
from sensormine.settings import Settings
from sensormine.telemetry.payload import encode_envelope
from serving.main import create_app
from tests.factories import DAY_US, make_tenant, readings

pytestmark = pytest.mark.integration

TENANTS = ("parent", "child", "sibling", "grandchild")
OTHER = "other"  # a second top-level tenant: what a parent must not reach
DENIED = ("parent", "sibling")
DAY = {"start": "2026-11-26T00:00:00Z", "end": "2026-11-27T00:00:00Z"}
SCHEMA = {
    "type": "object",
    "properties": {"values": {"type": "object", "properties": {"temperature": {"type": "number"}}}},
}
RULE = {"kind": "threshold", "metric": "temperature", "op": "gt", "value": 90}
MODBUS = {"protocol": "modbus", "host": "127.0.0.1", "points": [{"metric": "p", "address": 0, "data_type": "float32"}]}
# Routes outside the tenant matrix: no caller (log in, refresh), a device key (ingest), the caller itself.
OUTSIDE = {
    ("POST", "/api/auth/token"),
    ("POST", "/api/auth/refresh"),
    ("POST", "/api/auth/logout"),
    ("GET", "/api/auth/me"),
    ("POST", "/api/ingest"),
    ("POST", "/api/billing/webhooks/stripe"),
}
# What each route needs, by hand (None: no permission; the caller's own record or no caller at all).
PERMISSIONS: dict[tuple[str, str], str | None] = {
    ("GET", "/api/query/latest"): "telemetry:read",
    ("GET", "/api/query/telemetry"): "telemetry:read",
    ("GET", "/api/query/aggregate"): "telemetry:read",
    ("POST", "/api/query"): "telemetry:read",
    ("POST", "/api/auth/token"): None,
    ("POST", "/api/auth/refresh"): None,
    ("POST", "/api/auth/logout"): None,
    ("GET", "/api/auth/me"): None,
    ("POST", "/api/ingest"): None,  # a device key, not a caller
    ("GET", "/api/dlq"): "dlq:read",
    ("POST", "/api/dlq/replay"): "dlq:write",
    ("GET", "/api/devices/status"): "devices:read",
    ("GET", "/api/devices/{device_id}/status"): "devices:read",
    ("GET", "/api/devices/{device_id}/profile"): "devices:read",
    ("PUT", "/api/devices/{device_id}/profile"): "devices:write",
    ("DELETE", "/api/devices/{device_id}/profile"): "devices:write",
    ("POST", "/api/devices/import"): "devices:write",
    ("POST", "/api/devices"): "devices:write",
    ("GET", "/api/devices"): "devices:read",
    ("GET", "/api/devices/{device_id}"): "devices:read",
    ("PATCH", "/api/devices/{device_id}"): "devices:write",
    ("DELETE", "/api/devices/{device_id}"): "devices:write",
    ("POST", "/api/devices/{device_id}/rotate-key"): "devices:write",
    ("POST", "/api/devices/{device_id}/revoke-key"): "devices:write",
    ("GET", "/api/schemas"): "schemas:read",
    ("POST", "/api/schemas/{device_type}"): "schemas:write",
    ("GET", "/api/schemas/{device_type}"): "schemas:read",
    ("DELETE", "/api/schemas/{device_type}"): "schemas:write",
    ("GET", "/api/schemas/{device_type}/versions"): "schemas:read",
    ("GET", "/api/schemas/{device_type}/versions/{version}"): "schemas:read",
    ("POST", "/api/schemas/{device_type}/compatibility"): "schemas:read",
    ("POST", "/api/schemas/{device_type}/validate"): "schemas:read",
    ("POST", "/api/tenants"): "tenants:write",
    ("GET", "/api/tenants"): "tenants:read",
    ("GET", "/api/tenants/{tenant_id}"): "tenants:read",
    ("PATCH", "/api/tenants/{tenant_id}"): "tenants:write",
    ("GET", "/api/tenants/{tenant_id}/children"): "tenants:read",
    ("GET", "/api/tenants/{tenant_id}/branding"): "tenants:read",
    ("PUT", "/api/tenants/{tenant_id}/branding"): "tenants:write",
    ("GET", "/api/tenants/{tenant_id}/features"): "tenants:read",
    ("PUT", "/api/tenants/{tenant_id}/features"): "tenants:write",
    ("POST", "/api/users"): "users:write",
    ("GET", "/api/users"): "users:read",
    ("GET", "/api/users/{user_id}"): None,  # SELF_OR below
    ("PATCH", "/api/users/{user_id}"): None,  # SELF_OR below
    ("DELETE", "/api/users/{user_id}"): "users:write",
    ("POST", "/api/keys"): "keys:write",
    ("GET", "/api/keys"): "keys:read",
    ("GET", "/api/keys/{key_id}"): "keys:read",
    ("DELETE", "/api/keys/{key_id}"): "keys:write",
    ("GET", "/api/audit"): "audit:read",
    ("GET", "/api/usage"): "usage:read",
    ("GET", "/api/usage/events"): "usage:read",
    ("POST", "/api/alerts/rules"): "alerts:write",
    ("POST", "/api/alerts/rules/dry-run"): "alerts:read",
    ("GET", "/api/alerts/rules"): "alerts:read",
    ("GET", "/api/alerts/rules/{rule_id}"): "alerts:read",
    ("PATCH", "/api/alerts/rules/{rule_id}"): "alerts:write",
    ("DELETE", "/api/alerts/rules/{rule_id}"): "alerts:write",
    ("GET", "/api/alerts/alarms"): "alerts:read",
    ("GET", "/api/alerts/alarms/{alarm_id}"): "alerts:read",
    ("GET", "/api/alerts/alarms/{alarm_id}/history"): "alerts:read",
    ("GET", "/api/alerts/alarms/{alarm_id}/deliveries"): "alerts:read",
    ("POST", "/api/alerts/alarms/{alarm_id}/acknowledge"): "alerts:write",
    ("POST", "/api/alerts/alarms/{alarm_id}/clear"): "alerts:write",
    ("POST", "/api/alerts/alarms/{alarm_id}/comment"): "alerts:write",
    ("POST", "/api/alerts/alarms/{alarm_id}/assign"): "alerts:write",
    ("POST", "/api/alerts/channels"): "alerts:write",
    ("GET", "/api/alerts/channels"): "alerts:read",
    ("GET", "/api/alerts/channels/{channel_id}"): "alerts:read",
    ("DELETE", "/api/alerts/channels/{channel_id}"): "alerts:write",
    ("POST", "/api/alerts/policies"): "alerts:write",
    ("GET", "/api/alerts/policies"): "alerts:read",
    ("GET", "/api/alerts/policies/{policy_id}"): "alerts:read",
    ("DELETE", "/api/alerts/policies/{policy_id}"): "alerts:write",
    ("PUT", "/api/alerts/sms-provider"): "alerts:write",
    ("GET", "/api/alerts/sms-provider"): "alerts:read",
    ("DELETE", "/api/alerts/sms-provider"): "alerts:write",
    ("GET", "/api/billing/subscription"): "billing:read",
    ("PUT", "/api/billing/subscription"): "billing:write",
    ("DELETE", "/api/billing/subscription"): "billing:write",
    ("GET", "/api/billing/invoices"): "billing:read",
    ("GET", "/api/billing/usage"): "billing:read",
    ("GET", "/api/billing/invoice-preview"): "billing:read",
    ("GET", "/api/billing/allocation-policy"): "billing:read",
    ("PUT", "/api/billing/allocation-policy"): "billing:write",
    ("GET", "/api/billing/allocations"): "billing:read",
    ("POST", "/api/billing/setup-intent"): "billing:write",
    ("GET", "/api/billing/payment-methods"): "billing:read",
    ("POST", "/api/billing/payment-methods"): "billing:write",
    ("DELETE", "/api/billing/payment-methods/{payment_method_id}"): "billing:write",
    ("POST", "/api/billing/webhooks/stripe"): None,  # Stripe's signature, not a caller (test_billing_webhooks.py)
}
# Routes open to every caller for their own record, needing a permission for anyone else's.
SELF_OR = {("GET", "/api/users/{user_id}"): "users:read", ("PATCH", "/api/users/{user_id}"): "users:write"}
# Lists without a tenant parameter: they answer 200 with only what the caller may see.
LISTS = {("GET", "/api/tenants")}

Body = Callable[[str, str], dict[str, Any]]  # (target tenant, unique suffix) -> request keyword arguments
BODIES: dict[tuple[str, str], Body] = {
    ("POST", "/api/query"): lambda t, u: {
        "json": {"devices": [f"{t}-d1"], "tenant_id": t, "bucket": "1h", "aggs": ["avg"], **DAY}
    },
    ("POST", "/api/dlq/replay"): lambda t, u: {"json": {"tenant_id": t}},  # a real replay, not a dry run
    ("POST", "/api/devices"): lambda t, u: {"json": {"id": f"new-{u}", "device_type": "press"}},
    ("PUT", "/api/devices/{device_id}/profile"): lambda t, u: {"json": MODBUS},
    ("POST", "/api/devices/import"): lambda t, u: {
        "content": f"id,name,device_type\nimp-{u},Imported,press\n",
        "headers": {"Content-Type": "text/csv"},
    },
    ("PATCH", "/api/devices/{device_id}"): lambda t, u: {"json": {"name": f"renamed-{u}"}},
    ("POST", "/api/schemas/{device_type}"): lambda t, u: {"json": {"definition": SCHEMA}},
    ("POST", "/api/schemas/{device_type}/compatibility"): lambda t, u: {"json": {"definition": SCHEMA}},
    ("POST", "/api/schemas/{device_type}/validate"): lambda t, u: {
        "json": {"payload": {"ts": "2026-11-26T00:00:00Z", "values": {"temperature": 1}}}
    },
    ("POST", "/api/tenants"): lambda t, u: {"json": {"id": f"new-{u}", "parent_id": t}},
    ("PATCH", "/api/tenants/{tenant_id}"): lambda t, u: {"json": {"name": f"renamed-{u}"}},
    ("PUT", "/api/tenants/{tenant_id}/branding"): lambda t, u: {"json": {"primary_color": "#112233"}},
    ("PUT", "/api/tenants/{tenant_id}/features"): lambda t, u: {"json": {"sql_access": False}},
    ("POST", "/api/users"): lambda t, u: {
        "json": {"email": f"new-{u}@{t}.example", "password": "a-long-password", "role": "viewer", "tenant_id": t}
    },
    ("PATCH", "/api/users/{user_id}"): lambda t, u: {"json": {"name": f"renamed-{u}"}},
    ("POST", "/api/keys"): lambda t, u: {"json": {"name": "k", "role": "viewer", "scopes": ["read"], "tenant_id": t}},
    ("POST", "/api/alerts/rules"): lambda t, u: {"json": {"id": f"r-{u}", "condition": RULE}},
    ("PATCH", "/api/alerts/rules/{rule_id}"): lambda t, u: {"json": {"severity": "minor"}},
    ("POST", "/api/alerts/rules/dry-run"): lambda t, u: {"json": {"condition": RULE, "hours": 1}},
    ("POST", "/api/alerts/alarms/{alarm_id}/comment"): lambda t, u: {"json": {"text": f"seen {u}"}},
    ("POST", "/api/alerts/alarms/{alarm_id}/assign"): lambda t, u: {"json": {"assignee": f"someone-{u}"}},
    ("POST", "/api/alerts/channels"): lambda t, u: {
        "json": {"id": f"c-{u}", "kind": "email", "targets": [f"ops@{t}.example"]}
    },
    ("POST", "/api/alerts/policies"): lambda t, u: {
        "json": {"id": f"p-{u}", "levels": [{"after_s": 0, "channels": ["ops"]}]}
    },
    ("PUT", "/api/alerts/sms-provider"): lambda t, u: {
        "json": {"url": f"https://sms.{t}.example/send", "token": f"token-{u}"}
    },
    ("PUT", "/api/billing/subscription"): lambda t, u: {"json": {"plan": "pro", "interval": "month"}},
    ("PUT", "/api/billing/allocation-policy"): lambda t, u: {"json": {"strategy": "proportional_devices"}},
    ("POST", "/api/billing/payment-methods"): lambda t, u: {"json": {"payment_method": f"pm_{u}"}},
}
# Destructive routes run last, in this order, so the others find their objects.
LAST = [
    ("DELETE", "/api/devices/{device_id}/profile"),
    ("DELETE", "/api/alerts/rules/{rule_id}"),
    ("DELETE", "/api/alerts/policies/{policy_id}"),
    ("DELETE", "/api/alerts/channels/{channel_id}"),
    ("DELETE", "/api/alerts/sms-provider"),
    ("DELETE", "/api/billing/subscription"),
    ("DELETE", "/api/billing/payment-methods/{payment_method_id}"),
    ("POST", "/api/devices/{device_id}/rotate-key"),
    ("POST", "/api/devices/{device_id}/revoke-key"),
    ("DELETE", "/api/devices/{device_id}"),
    ("DELETE", "/api/schemas/{device_type}"),
    ("DELETE", "/api/keys/{key_id}"),
    ("DELETE", "/api/users/{user_id}"),
]
# Path values that differ from the defaults for one route: a schema no device uses can be deleted.
OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {("DELETE", "/api/schemas/{device_type}"): {"device_type": "spare"}}
CALLERS = ["tenant_admin", "operator", "viewer", "device", "user:tenant_admin"]


def _declared(op: dict[str, Any]) -> set[str]:
    return {s for req in op.get("security", []) for scopes in req.values() for s in scopes}


def _operations(app: Any) -> list[tuple[str, str, set[str], dict[str, dict]]]:
    """(method, path, permissions written here, parameters by name) of every /api operation, destructive ones last."""
    ops = []
    for path, methods in app.openapi()["paths"].items():
        for method, op in methods.items():
            if not path.startswith("/api/") or (method.upper(), path) in OUTSIDE:
                continue
            needed = PERMISSIONS[(method.upper(), path)]
            perms = {needed} if needed else set()
            params = {p["name"]: p for p in op.get("parameters", []) if p["in"] in ("path", "query")}
            ops.append((method.upper(), path, perms, params))
    order = {k: i for i, k in enumerate(LAST)}
    return sorted(ops, key=lambda o: order.get((o[0], o[1]), -1))


def test_every_route_is_in_the_matrix(settings: Settings) -> None:
    """A new route needs its body here (when it has one) and a place among the destructive ones."""
    app = create_app(settings)
    spec = app.openapi()["paths"]
    missing = [
        (m.upper(), p)
        for p, methods in spec.items()
        for m, op in methods.items()
        if p.startswith("/api/")
        and (m.upper(), p) not in OUTSIDE
        and "requestBody" in op
        and (m.upper(), p) not in BODIES
    ]
    assert not missing, f"add request bodies for {missing}"
    assert all((m, p) in {(o[0], o[1]) for o in _operations(app)} for m, p in LAST)


def test_every_route_declares_the_permission_written_here(settings: Settings) -> None:
    """The app's declarations (OpenAPI security scopes) must equal the table above, route by route."""
    spec = create_app(settings).openapi()["paths"]
    declared = {
        (m.upper(), p): _declared(op)
        for p, methods in spec.items()
        for m, op in methods.items()
        if p.startswith("/api/")
    }
    assert set(declared) == set(PERMISSIONS), "routes added or gone: write their permission in PERMISSIONS"
    wrong = {k: v for k, v in declared.items() if v != ({PERMISSIONS[k]} if PERMISSIONS[k] else set())}
    assert not wrong, f"routes declaring another permission than written here: {wrong}"


@pytest.fixture
def world(conn: psycopg.Connection) -> dict[str, Any]:
    """Four tenants, each with two devices, points, two schemas, a profile, a viewer user and a spare API key."""
    # Enterprise: no request rate limit, so the matrix's bursts of requests are answered, not 429.
    make_tenant(conn, "parent", ["parent-d1", "parent-d2"], plan="enterprise")
    make_tenant(conn, "child", ["child-d1", "child-d2"], parent_id="parent")
    make_tenant(conn, "sibling", ["sibling-d1", "sibling-d2"], parent_id="parent")
    # The grandchild pays for its own plan: it has an invoice of its own to preview and allocate.
    make_tenant(conn, "grandchild", ["grandchild-d1", "grandchild-d2"], parent_id="child", plan="pro")
    make_tenant(conn, OTHER, [f"{OTHER}-d1", f"{OTHER}-d2"], plan="enterprise")
    users, keys, alarms = {}, {}, {}
    for t in (*TENANTS, OTHER):
        HotStoreWriter(conn).write(readings(t, f"{t}-d1", 3))
        # A pending dead letter whose payload is valid now: a replay re-submits it.
        good = encode_envelope(t, f"{t}-d1", "mqtt", readings(t, f"{t}-d1", 1, start_us=DAY_US + 3_600_000_000))
        store_dead_letter(conn, "mqtt", f"mqtt:{t}/{t}-d1", "schema violation (fixed since)", good, t, f"{t}-d1")
        register_schema(conn, t, "press", SCHEMA)
        register_schema(conn, t, "spare", SCHEMA)
        set_profile(conn, t, f"{t}-d1", MODBUS)
        users[t] = create_user(conn, t, f"viewer@{t}.example", "a-long-password", "viewer").id
        keys[t] = create_api_key(conn, t, "spare", role="viewer").split("_")[1]
        insert_channel(conn, t, "ops", "email", [f"ops@{t}.example"])
        insert_policy(conn, t, "on-call", "on-call", parse_policy([{"after_s": 0, "channels": ["ops"]}], None))
        set_sms_provider(conn, t, f"https://sms.{t}.example/send", "seeded-token")
        rule = insert_rule(conn, Rule(t, "overheat", "overheat", "major", parse_condition(RULE), Scope()))
        (raised,) = apply_transitions(conn, [Transition("raise", rule, t, f"{t}-d1", DAY_US, "temperature", 95.0)])
        alarms[t] = raised.alarm.id
        conn.execute(
            "INSERT INTO usage_daily (tenant_id, day, resource, quantity, unit) "
            "VALUES (%s, %s, 'api_calls', 5, 'calls')",
            (t, DAY["start"][:10]),
        )
        conn.execute(
            "INSERT INTO tenant_payment_methods (stripe_payment_method_id, tenant_id, type, brand, last4, is_default) "
            "VALUES (%s, %s, 'card', 'visa', '4242', true)",
            (f"pm_{t}", t),
        )
        conn.execute(
            "INSERT INTO tenant_invoices (stripe_invoice_id, tenant_id, status, currency, amount_due, amount_paid, "
            "stripe_created, event_created) VALUES (%s, %s, 'open', 'usd', 9900, 0, now(), now())",
            (f"in_{t}", t),
        )
    # The catalogue as `sensormine billing sync-catalog` records it (subscriptions go to stripe-mock).
    conn.execute("INSERT INTO stripe_catalog (key, stripe_id) VALUES ('price:pro:month', 'price_matrix')")
    callers = {r: create_api_key(conn, "child", r, role=r) for r in CALLERS if not r.startswith("user:")}
    create_user(conn, "child", "admin@child.example", "a-long-password", "tenant_admin")
    conn.commit()
    return {"users": users, "keys": keys, "alarms": alarms, "callers": callers}


def _snapshot(conn: psycopg.Connection, tenants: tuple[str, ...]) -> dict[str, list]:
    """Every row an outsider could change, of `tenants`."""
    queries = {
        "tenants": "SELECT id, name, plan, settings, features, branding FROM tenants WHERE id = ANY(%s)",
        "devices": "SELECT tenant_id, id, name, device_type, key_hash FROM devices WHERE tenant_id = ANY(%s)",
        "users": "SELECT id, name, role, disabled_at, token_version FROM users WHERE tenant_id = ANY(%s)",
        "keys": "SELECT id, revoked_at FROM api_keys WHERE tenant_id = ANY(%s)",
        "schemas": "SELECT tenant_id, device_type, version FROM device_schemas WHERE tenant_id = ANY(%s)",
        "profiles": "SELECT tenant_id, device_id FROM device_profiles WHERE tenant_id = ANY(%s)",
        "children": "SELECT id FROM tenants WHERE parent_id = ANY(%s)",
        "telemetry": "SELECT tenant_id, count(*), sum(value), max(ingest_ts) FROM telemetry "
        "WHERE tenant_id = ANY(%s) GROUP BY tenant_id",
        "dead_letters": "SELECT id, tenant_id, reason FROM dead_letters WHERE tenant_id = ANY(%s)",
        "dlq_replays": "SELECT tenant_id, dead_letter_id FROM dlq_replays WHERE tenant_id = ANY(%s)",
        "audit": "SELECT id, tenant_id, action FROM audit_log WHERE tenant_id = ANY(%s)",
        "usage": "SELECT tenant_id, metric, day, value FROM usage WHERE tenant_id = ANY(%s)",
        "events": "SELECT tenant_id, type FROM tenant_events WHERE tenant_id = ANY(%s)",
        "alert_rules": "SELECT tenant_id, id, name, severity, revision, enabled FROM alert_rules "
        "WHERE tenant_id = ANY(%s)",
        "alarms": "SELECT tenant_id, id, status, acknowledged, latched, assignee, count FROM alarms "
        "WHERE tenant_id = ANY(%s)",
        "alarm_events": "SELECT tenant_id, alarm_id, kind FROM alarm_events WHERE tenant_id = ANY(%s)",
        "alert_channels": "SELECT tenant_id, id, kind, targets, secret FROM alert_channels WHERE tenant_id = ANY(%s)",
        "policies": "SELECT tenant_id, id, levels FROM escalation_policies WHERE tenant_id = ANY(%s)",
        "sms_providers": "SELECT tenant_id, url, token FROM alert_sms_providers WHERE tenant_id = ANY(%s)",
        "subscriptions": "SELECT tenant_id, stripe_subscription_id, plan, status FROM tenant_subscriptions "
        "WHERE tenant_id = ANY(%s)",
        "customers": "SELECT id, stripe_customer_id FROM tenants WHERE id = ANY(%s)",
        "invoices": "SELECT tenant_id, stripe_invoice_id, status FROM tenant_invoices WHERE tenant_id = ANY(%s)",
        "payment": "SELECT tenant_id, status, grace_until FROM tenant_payment_status WHERE tenant_id = ANY(%s)",
        "usage_daily": "SELECT tenant_id, day, resource, quantity FROM usage_daily WHERE tenant_id = ANY(%s)",
        "chargeback": "SELECT tenant_id, strategy, shares FROM chargeback_policies WHERE tenant_id = ANY(%s)",
        "payment_methods": "SELECT tenant_id, stripe_payment_method_id, is_default FROM tenant_payment_methods "
        "WHERE tenant_id = ANY(%s)",
    }
    out = {name: sorted(map(str, conn.execute(q, (list(tenants),)).fetchall())) for name, q in queries.items()}
    conn.commit()
    return out


def _request(method: str, path: str, params: dict[str, dict], target: str, world: dict[str, Any]) -> dict[str, Any]:
    values = {
        "tenant_id": target,
        "device_id": f"{target}-d1",
        "device_type": "press",
        "version": 1,
        "user_id": world["users"][target],
        "key_id": world["keys"][target],
        "rule_id": "overheat",
        "channel_id": "ops",
        "policy_id": "on-call",
        "alarm_id": world["alarms"][target],
        "bucket": "1h",
        "month": DAY["start"][:7],
        "payment_method_id": f"pm_{target}",
        **DAY,
        **OVERRIDES.get((method, path), {}),
    }
    url = path
    query: dict[str, Any] = {}
    for name, p in params.items():
        if p["in"] == "path":
            url = url.replace("{" + name + "}", str(values[name]))
        elif name == "tenant_id" or (p.get("required") and name in values):
            query[name] = values[name]
    kwargs = BODIES.get((method, path), lambda t, u: {})(target, uuid.uuid4().hex[:8])
    return {"method": method, "url": url, "params": query, **kwargs}


@pytest.mark.parametrize("caller", CALLERS)
def test_isolation_matrix(settings: Settings, conn: psycopg.Connection, world: dict[str, Any], caller: str) -> None:
    before = _snapshot(conn, DENIED)
    failures: list[str] = []
    with TestClient(create_app(settings)) as client:
        if caller.startswith("user:"):
            token = client.post(
                "/api/auth/token", data={"username": "admin@child.example", "password": "a-long-password"}
            ).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            role = Role(caller.split(":", 1)[1])
        else:
            auth = {"X-API-Key": world["callers"][caller]}
            role = Role(caller)
        held = ROLE_PERMISSIONS[role]
        ops = _operations(client.app)
        assert len(ops) >= 45, "the matrix lost its routes"
        for target, (method, path, perms, params) in itertools.product((*DENIED, "grandchild"), ops):
            if target == "grandchild" and (method, path) in [o for o in LAST]:
                continue  # destructive routes run once, below, after everything else
            failures += _check(client, auth, held, method, path, perms, params, target, world)
        for method, path, perms, params in ops:
            if (method, path) in LAST:
                failures += _check(client, auth, held, method, path, perms, params, "grandchild", world)
    assert not failures, "\n".join(failures)
    assert _snapshot(conn, DENIED) == before, "a caller from `child` changed its parent's or sibling's rows"
    if "dlq:write" in held:  # the replay was real: its own sub-tenant's dead letter went back in
        replayed = conn.execute("SELECT count(*) FROM dlq_replays WHERE tenant_id = 'grandchild'").fetchone()
        conn.commit()
        assert replayed is not None and replayed[0] >= 1


def _check(
    client: TestClient,
    auth: dict[str, str],
    held: frozenset[str],
    method: str,
    path: str,
    perms: set[str],
    params: dict[str, dict],
    target: str,
    world: dict[str, Any],
    denied: tuple[str, ...] = DENIED,
) -> list[str]:
    req = _request(method, path, params, target, world)
    req["headers"] = {**auth, **req.get("headers", {})}
    resp = client.request(**req)
    needed = perms or ({SELF_OR[(method, path)]} if (method, path) in SELF_OR else set())
    allowed = needed <= held
    where = f"{method} {path} -> {target}: {resp.status_code} {resp.text[:200]}"
    if resp.status_code >= 500:
        return [f"server error: {where}"]
    if not allowed:
        return [] if resp.status_code == 403 else [f"expected 403 (lacks {needed - held}): {where}"]
    if target in denied:
        if (method, path) in LISTS:
            ids = {item["id"] for item in resp.json()["items"]} if resp.is_success else {target}
            return [] if target not in ids else [f"list leaks {target}: {where}"]
        return [] if resp.status_code == 404 else [f"expected 404 for {target}: {where}"]
    return [] if resp.is_success else [f"expected success in its own sub-tenant: {where}"]


@pytest.mark.parametrize(
    ("home", "outside"),
    [
        ("grandchild", ("child", "parent", "sibling", OTHER)),  # upwards: its parent and grandparent, and across
        ("sibling", ("child", "grandchild", "parent", OTHER)),  # across to a sibling's subtree, and up
        ("parent", (OTHER,)),  # a top-level tenant: everything below it is its own, another tree is not
    ],
)
def test_callers_elsewhere_in_the_tree_reach_nothing_outside_their_subtree(
    settings: Settings, conn: psycopg.Connection, world: dict[str, Any], home: str, outside: tuple[str, ...]
) -> None:
    """The other directions: a tenant administrator of `home` aims every route at every tenant it may not see
    (404, or 403 where the role lacks the permission), and none of their rows changes."""
    key = create_api_key(conn, home, "matrix", role="tenant_admin")
    conn.commit()
    before = _snapshot(conn, outside)
    failures: list[str] = []
    held = ROLE_PERMISSIONS[Role.TENANT_ADMIN]
    # A grandchild caller pays its own pro plan (100 requests a second, bursts of 200), and this sends
    # hundreds at once: rate limits (tests/integration/test_quotas.py) would answer before tenancy does.
    unlimited = settings.model_copy(update={"limits_enabled": False})
    with TestClient(create_app(unlimited)) as client:
        for target, (method, path, perms, params) in itertools.product(outside, _operations(client.app)):
            failures += _check(client, {"X-API-Key": key}, held, method, path, perms, params, target, world, outside)
    assert not failures, "\n".join(failures)
    assert _snapshot(conn, outside) == before, f"a caller from `{home}` changed rows outside its subtree"


def test_every_route_refuses_a_caller_without_credentials(
    settings: Settings, conn: psycopg.Connection, world: dict[str, Any]
) -> None:
    """No credential at all: 401 on every route that needs one, and nothing of any tenant changes."""
    before = _snapshot(conn, TENANTS)
    failures = []
    with TestClient(create_app(settings)) as client:
        for method, path, _, params in _operations(client.app):
            for target in TENANTS:
                resp = client.request(**_request(method, path, params, target, world))
                if resp.status_code != 401:
                    failures.append(f"{method} {path} -> {target}: {resp.status_code} {resp.text[:120]}")
    assert not failures, "\n".join(failures)
    assert _snapshot(conn, TENANTS) == before


def test_ingest_and_auth_routes_stay_inside_the_callers_tenant(
    settings: Settings, conn: psycopg.Connection, world: dict[str, Any]
) -> None:
    """The routes outside the tenant matrix: a device key writes to its own device only, an unknown key
    writes nothing; `me` shows the caller's subtree only; a logout ends the caller's sessions only."""
    from sensormine.devices.registry import create_device

    sibling_key = create_device(conn, "sibling", "sibling-push")[1]
    create_user(conn, "grandchild", "admin@grandchild.example", "a-long-password", "tenant_admin")
    conn.commit()
    others = ("parent", "child", "grandchild")
    before = _snapshot(conn, others)
    item = [{"ts": "2026-11-26T05:00:00Z", "values": {"temperature": 1.5}}]
    with TestClient(create_app(settings.model_copy(update={"kafka_bootstrap": None}))) as client:
        ok = client.post("/api/ingest", json=item, headers={"X-Device-Key": sibling_key})
        assert ok.status_code == 200 and ok.json()["tenant_id"] == "sibling", ok.text
        unknown = client.post("/api/ingest", json=item, headers={"X-Device-Key": sibling_key[:-4] + "AAAA"})
        assert unknown.status_code == 401, unknown.text

        def login(email: str) -> dict[str, str]:
            resp = client.post("/api/auth/token", data={"username": email, "password": "a-long-password"})
            assert resp.status_code == 200, resp.text
            return {"Authorization": f"Bearer {resp.json()['access_token']}"}

        grandchild, child = login("admin@grandchild.example"), login("admin@child.example")
        assert client.get("/api/auth/me", headers=grandchild).json()["visible_tenants"] == ["grandchild"]
        assert sorted(client.get("/api/auth/me", headers=child).json()["visible_tenants"]) == ["child", "grandchild"]
        assert client.post("/api/auth/logout", headers=grandchild).status_code == 204
        assert client.get("/api/auth/me", headers=grandchild).status_code == 401
        assert client.get("/api/auth/me", headers=child).status_code == 200
    after = _snapshot(conn, others)
    # Their own doing, the only changes among them: the grandchild administrator's logout (its token
    # version) and the API calls child and grandchild made (usage).
    before_users, after_users = before.pop("users"), after.pop("users")
    before.pop("usage"), after.pop("usage")
    assert after == before
    assert len(after_users) == len(before_users) and len(set(after_users) - set(before_users)) == 1
    pushed = conn.execute("SELECT tenant_id, device_id FROM telemetry WHERE metric = 'temperature' AND value = 1.5")
    assert pushed.fetchall() == [("sibling", "sibling-push")]
