"""Registry operations not covered through the CLI: listing devices, revoking API keys."""

from __future__ import annotations

import psycopg
import pytest

from sensormine.devices.registry import list_devices
from sensormine.identity.api_keys import resolve_api_key, revoke_api_key
from tests.factories import make_tenant

pytestmark = pytest.mark.integration


def test_list_devices_is_limited_to_the_given_tenants(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["b", "a"])
    make_tenant(conn, "globex", ["a"])
    assert [(d.tenant_id, d.id) for d in list_devices(conn, ["acme"])] == [("acme", "a"), ("acme", "b")]
    assert [d.tenant_id for d in list_devices(conn, ["acme", "globex"])] == ["acme", "acme", "globex"]


def test_a_revoked_key_no_longer_resolves(conn: psycopg.Connection) -> None:
    key = make_tenant(conn, "acme", [])
    key_id = key.split("_")[1]
    assert resolve_api_key(conn, key) is not None
    assert revoke_api_key(conn, key_id) is True
    assert resolve_api_key(conn, key) is None
    assert revoke_api_key(conn, key_id) is False  # already revoked
