"""Device connection profiles for the OPC UA and Modbus daemons, stored in the registry.

A profile says how a daemon reaches one device and which of its points become which metrics.
Profiles are validated pydantic models (a bad profile is refused when it is stored, never
discovered by a daemon at 3 a.m.) kept as JSON in `device_profiles`; every change bumps the
row's `revision`, which is how daemons notice edits without a restart (`ProfileWatcher`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

Protocol = Literal["opcua", "modbus"]


class ProfileError(ValueError):
    """A profile that cannot be stored (invalid, or for an unknown device)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpcUaNode(_Model):
    """One OPC UA variable node mapped to a metric, watched by a monitored item."""

    node_id: str = Field(min_length=1, description='e.g. "ns=2;s=Motor1.Temperature" or "ns=2;i=1001"')
    metric: str = Field(min_length=1, max_length=128)
    sampling_interval_ms: float = Field(1000.0, ge=0)
    deadband: float | None = Field(None, ge=0, description="Absolute deadband; None reports every change.")


class OpcUaProfile(_Model):
    """How to reach an OPC UA server and which nodes to subscribe to."""

    protocol: Literal["opcua"] = "opcua"
    endpoint: str = Field(pattern=r"^opc\.tcp://", description="opc.tcp://host:port/path")
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    security_policy: Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"] = "None"
    username: str | None = None
    password: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    publishing_interval_ms: float = Field(1000.0, gt=0)
    nodes: list[OpcUaNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> OpcUaProfile:
        if (self.security_mode == "None") != (self.security_policy == "None"):
            raise ValueError("security_mode and security_policy must both be None or both be set")
        if self.security_mode != "None" and not (self.certificate_path and self.private_key_path):
            raise ValueError("a secured endpoint needs certificate_path and private_key_path")
        if (self.password is None) != (self.username is None):
            raise ValueError("username and password go together")
        metrics = [n.metric for n in self.nodes]
        if len(set(metrics)) != len(metrics):
            raise ValueError("each node must map to its own metric")
        return self


ModbusDataType = Literal["int16", "uint16", "int32", "uint32", "float32", "float64", "bool"]
REGISTER_WORDS: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}


class ModbusPoint(_Model):
    """One value read from a Modbus table and mapped to a metric: value = raw * scale + offset."""

    metric: str = Field(min_length=1, max_length=128)
    table: Literal["holding", "input", "coil", "discrete"] = "holding"
    address: int = Field(ge=0, le=65535)
    data_type: ModbusDataType = "uint16"
    byte_order: Literal["big", "little"] = "big"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    offset: float = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        if self.table in ("coil", "discrete") and self.data_type != "bool":
            raise ValueError(f"{self.table} points are single bits: data_type must be bool")
        if self.address + self.words - 1 > 65535:
            raise ValueError("point runs past register 65535")
        return self

    @property
    def words(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the point occupies."""
        return 1 if self.table in ("coil", "discrete") else REGISTER_WORDS[self.data_type]


class ModbusProfile(_Model):
    """How to poll a Modbus TCP device: where, how often, and its register map."""

    protocol: Literal["modbus"] = "modbus"
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    poll_interval_ms: int = Field(1000, ge=10)
    timeout_ms: int = Field(1000, ge=10)
    points: list[ModbusPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_metrics(self) -> ModbusProfile:
        metrics = [p.metric for p in self.points]
        if len(set(metrics)) != len(metrics):
            raise ValueError("each point must map to its own metric")
        return self


DeviceProfile = Annotated[OpcUaProfile | ModbusProfile, Field(discriminator="protocol")]
_ADAPTER: TypeAdapter[OpcUaProfile | ModbusProfile] = TypeAdapter(DeviceProfile)


def parse_profile(data: object) -> OpcUaProfile | ModbusProfile:
    """A validated profile from JSON-like data; ProfileError with every problem otherwise."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}" for e in exc.errors())
        raise ProfileError(f"invalid device profile: {problems}") from None


@dataclass(frozen=True)
class StoredProfile:
    """A profile as stored: whose it is and its revision."""

    tenant_id: str
    device_id: str
    profile: OpcUaProfile | ModbusProfile
    revision: int


def set_profile(
    conn: psycopg.Connection, tenant_id: str, device_id: str, profile: OpcUaProfile | ModbusProfile | dict[str, object]
) -> StoredProfile:
    """Store (create or replace) a device's profile; returns it with its new revision."""
    model = profile if isinstance(profile, OpcUaProfile | ModbusProfile) else parse_profile(profile)
    with conn.transaction():
        exists = conn.execute("SELECT 1 FROM devices WHERE tenant_id = %s AND id = %s", (tenant_id, device_id))
        if exists.fetchone() is None:
            raise ProfileError(f"no device {device_id!r} in tenant {tenant_id!r}")
        row = conn.execute(
            "INSERT INTO device_profiles (tenant_id, device_id, protocol, profile) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (tenant_id, device_id) DO UPDATE SET protocol = excluded.protocol, "
            "profile = excluded.profile, revision = nextval('device_profile_revisions'), updated_at = now() "
            "RETURNING revision",
            (tenant_id, device_id, model.protocol, Jsonb(model.model_dump(mode="json"))),
        ).fetchone()
    assert row is not None
    return StoredProfile(tenant_id, device_id, model, row[0])


def get_profile(conn: psycopg.Connection, tenant_id: str, device_id: str) -> StoredProfile | None:
    """A device's profile, or None."""
    row = conn.execute(
        "SELECT profile, revision FROM device_profiles WHERE tenant_id = %s AND device_id = %s", (tenant_id, device_id)
    ).fetchone()
    return None if row is None else StoredProfile(tenant_id, device_id, parse_profile(row[0]), row[1])


def delete_profile(conn: psycopg.Connection, tenant_id: str, device_id: str) -> bool:
    """Remove a device's profile; True when there was one."""
    with conn.transaction():
        cur = conn.execute(
            "DELETE FROM device_profiles WHERE tenant_id = %s AND device_id = %s", (tenant_id, device_id)
        )
    return cur.rowcount > 0


def list_profiles(conn: psycopg.Connection, protocol: Protocol) -> list[StoredProfile]:
    """Every stored profile of one protocol, ordered by tenant and device."""
    rows = conn.execute(
        "SELECT tenant_id, device_id, profile, revision FROM device_profiles WHERE protocol = %s "
        "ORDER BY tenant_id, device_id",
        (protocol,),
    ).fetchall()
    return [StoredProfile(t, d, parse_profile(p), r) for t, d, p, r in rows]


@dataclass(frozen=True)
class ProfileChanges:
    """What changed between two looks at the stored profiles of one protocol."""

    added: list[StoredProfile]
    changed: list[StoredProfile]
    removed: list[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class ProfileWatcher:
    """Diffs the stored profiles of one protocol against the last look (call `poll` every few seconds)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol: Protocol = protocol
        self.current: dict[tuple[str, str], StoredProfile] = {}

    def poll(self, conn: psycopg.Connection) -> ProfileChanges:
        """Read the profiles now; report added, changed (new revision) and removed devices."""
        latest = {(p.tenant_id, p.device_id): p for p in list_profiles(conn, self.protocol)}
        conn.commit()
        added = [p for k, p in latest.items() if k not in self.current]
        changed = [p for k, p in latest.items() if k in self.current and self.current[k].revision != p.revision]
        removed = sorted(k for k in self.current if k not in latest)
        self.current = latest
        return ProfileChanges(added, changed, removed)
