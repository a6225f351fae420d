"""Device profiles in the registry: stored validated, revisioned, and watched by daemons."""

from __future__ import annotations

import psycopg
import pytest

from sensormine.devices.profiles import ProfileError, ProfileWatcher, delete_profile, get_profile, set_profile
from tests.factories import make_tenant

pytestmark = pytest.mark.integration

OPCUA = {
    "protocol": "opcua",
    "endpoint": "opc.tcp://127.0.0.1:4840/sim",
    "nodes": [{"node_id": "ns=2;i=2", "metric": "t"}],
}
MODBUS = {"protocol": "modbus", "host": "127.0.0.1", "points": [{"metric": "p", "address": 0}]}


def test_profiles_are_stored_revisioned_and_watched(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["plc-1", "opc-1", "opc-2"])
    watcher = ProfileWatcher("opcua")
    assert not watcher.poll(conn)

    first = set_profile(conn, "acme", "opc-1", OPCUA)
    set_profile(conn, "acme", "plc-1", MODBUS)
    changes = watcher.poll(conn)
    assert [(p.device_id, p.revision) for p in changes.added] == [("opc-1", first.revision)]
    assert not changes.changed and not changes.removed

    edited = set_profile(conn, "acme", "opc-1", {**OPCUA, "publishing_interval_ms": 250})
    assert edited.revision > first.revision
    changes = watcher.poll(conn)
    assert [p.profile.publishing_interval_ms for p in changes.changed] == [250]  # type: ignore[union-attr]

    stored = get_profile(conn, "acme", "opc-1")
    assert stored is not None and stored.profile == edited.profile
    assert delete_profile(conn, "acme", "opc-1") and not delete_profile(conn, "acme", "opc-1")
    assert watcher.poll(conn).removed == [("acme", "opc-1")]
    assert [p.device_id for p in ProfileWatcher("modbus").poll(conn).added] == ["plc-1"]


def test_profiles_of_unknown_devices_or_invalid_ones_are_refused(conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["opc-1"])
    with pytest.raises(ProfileError, match="no device"):
        set_profile(conn, "acme", "ghost", OPCUA)
    with pytest.raises(ProfileError, match="nodes"):
        set_profile(conn, "acme", "opc-1", {**OPCUA, "nodes": []})
    assert get_profile(conn, "acme", "opc-1") is None
