"""Device profile validation: what a daemon can rely on once a profile is stored."""

from __future__ import annotations

import pytest

from sensormine.devices.profiles import ModbusPoint, ModbusProfile, OpcUaProfile, ProfileError, parse_profile

OPCUA = {
    "protocol": "opcua",
    "endpoint": "opc.tcp://127.0.0.1:4840/sim",
    "nodes": [{"node_id": "ns=2;i=2", "metric": "t"}],
}
MODBUS = {"protocol": "modbus", "host": "127.0.0.1", "points": [{"metric": "p", "address": 0, "data_type": "float32"}]}


def test_valid_profiles_parse_to_their_protocol() -> None:
    assert isinstance(parse_profile(OPCUA), OpcUaProfile)
    profile = parse_profile(MODBUS)
    assert isinstance(profile, ModbusProfile) and profile.port == 502 and profile.points[0].words == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**OPCUA, "endpoint": "http://x"}, "endpoint"),
        ({**OPCUA, "nodes": []}, "nodes"),
        ({**OPCUA, "security_mode": "Sign"}, "both be None"),
        ({**OPCUA, "username": "u"}, "username and password"),
        ({**OPCUA, "nodes": [{"node_id": "a", "metric": "m"}, {"node_id": "b", "metric": "m"}]}, "own metric"),
        ({**MODBUS, "points": [{"metric": "c", "table": "coil", "address": 1, "data_type": "int16"}]}, "bool"),
        ({**MODBUS, "points": [{"metric": "x", "address": 65535, "data_type": "float64"}]}, "65535"),
        ({**MODBUS, "unit_id": 300}, "unit_id"),
        ({**MODBUS, "colour": "red"}, "colour"),
        ({"protocol": "bacnet"}, "protocol"),
        ("not an object", "profile"),
    ],
)
def test_invalid_profiles_are_refused_with_the_reason(data: object, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile(data)


def test_point_width_follows_its_type() -> None:
    widths = {t: ModbusPoint(metric="m", address=0, data_type=t).words for t in ("int16", "uint32", "float64")}
    assert widths == {"int16": 1, "uint32": 2, "float64": 4}
    assert ModbusPoint(metric="m", table="coil", address=0, data_type="bool").words == 1
