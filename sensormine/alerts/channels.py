"""Notification channels and escalation policies: where alarm notifications go, and when.

A channel is e-mail (addresses), SMS (E.164 numbers) or a webhook (one http(s) URL, its body signed
with a secret made here and shown once). A policy lists levels, each `after_s` seconds after the
raise with its channels; while the alarm is active and unacknowledged, each level is notified when
due, and with `repeat_s` the last level reached is reminded every `repeat_s` until someone
acknowledges or the alarm clears. `escalation_steps` is the schedule, with no I/O.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sensormine.alerts.rules import RULE_ID, RuleError

ChannelKind = Literal["email", "webhook", "sms"]
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")


class UnknownChannel(LookupError):
    """No such channel (or policy) in the tenant."""


class DuplicateChannel(ValueError):
    """A channel (or policy) id is taken in the tenant."""


@dataclass(frozen=True)
class Channel:
    """A stored channel; `secret` only where the caller may see it (the evaluator, creation)."""

    tenant_id: str
    id: str
    kind: str
    targets: list[str]
    enabled: bool
    created_at: datetime | None = None
    secret: str | None = None


def check_channel(channel_id: str, kind: str, targets: list[str]) -> None:
    """Refuse a channel that could never deliver (RuleError saying why)."""
    if not RULE_ID.match(channel_id):
        raise RuleError(f"channel id {channel_id!r}: 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit")
    if not 1 <= len(targets) <= 50:
        raise RuleError("a channel needs 1-50 targets")
    pattern, what = {"email": (_EMAIL, "an e-mail address"), "sms": (_E164, "an E.164 number like +4915112345678"),
                     "webhook": (_URL, "an http(s) URL")}[kind]  # fmt: skip
    if kind == "webhook" and len(targets) != 1:
        raise RuleError("a webhook channel has exactly one URL")
    bad = [t for t in targets if not pattern.match(t)]
    if bad:
        raise RuleError(f"{bad[0]!r} is not {what}")


def insert_channel(conn: psycopg.Connection, tenant_id: str, channel_id: str, kind: str, targets: list[str]) -> Channel:
    """Store a channel; a webhook gets its signing secret here (returned this once)."""
    check_channel(channel_id, kind, targets)
    secret = "whsec_" + secrets.token_urlsafe(32) if kind == "webhook" else None
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO alert_channels (tenant_id, id, kind, targets, secret) VALUES (%s, %s, %s, %s, %s) "
                "RETURNING created_at",
                (tenant_id, channel_id, kind, targets, secret),
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise DuplicateChannel(f"tenant {tenant_id!r} already has a channel {channel_id!r}") from None
    assert row is not None
    return Channel(tenant_id, channel_id, kind, targets, True, row[0], secret)


def list_channels(conn: psycopg.Connection, tenant_id: str) -> list[Channel]:
    """A tenant's channels, without secrets."""
    rows = conn.execute(
        "SELECT tenant_id, id, kind, targets, enabled, created_at FROM alert_channels WHERE tenant_id = %s ORDER BY id",
        (tenant_id,),
    ).fetchall()
    return [Channel(*r) for r in rows]


def get_channel(conn: psycopg.Connection, tenant_id: str, channel_id: str) -> Channel:
    """One channel, without its secret (UnknownChannel)."""
    for c in list_channels(conn, tenant_id):
        if c.id == channel_id:
            return c
    raise UnknownChannel(f"channel {channel_id!r} not found in tenant {tenant_id!r}; GET /api/alerts/channels")


def delete_channel(conn: psycopg.Connection, tenant_id: str, channel_id: str) -> None:
    """Delete a channel (UnknownChannel); policies naming it skip it from then on."""
    if (
        conn.execute("DELETE FROM alert_channels WHERE tenant_id = %s AND id = %s", (tenant_id, channel_id)).rowcount
        == 0
    ):
        raise UnknownChannel(f"channel {channel_id!r} not found in tenant {tenant_id!r}")


@dataclass(frozen=True)
class SmsProviderConfig:
    """A tenant's own SMS gateway; `token` only where the caller may use it (the notifier)."""

    tenant_id: str
    url: str
    updated_at: datetime | None = None
    token: str | None = None


class UnknownSmsProvider(LookupError):
    """The tenant has no SMS gateway of its own."""


def check_sms_provider(url: str, token: str) -> None:
    """Refuse a gateway that could never deliver (RuleError saying why)."""
    if not _URL.match(url):
        raise RuleError(f"{url!r} is not an http(s) URL")
    if not 8 <= len(token) <= 512 or token.strip() != token:
        raise RuleError("the gateway's token: 8-512 characters, no leading or trailing space")


def set_sms_provider(conn: psycopg.Connection, tenant_id: str, url: str, token: str) -> SmsProviderConfig:
    """Store (or replace) a tenant's SMS gateway (RuleError); returned without its token."""
    check_sms_provider(url, token)
    row = conn.execute(
        "INSERT INTO alert_sms_providers (tenant_id, url, token) VALUES (%s, %s, %s) "
        "ON CONFLICT (tenant_id) DO UPDATE SET url = excluded.url, token = excluded.token, updated_at = now() "
        "RETURNING updated_at",
        (tenant_id, url, token),
    ).fetchone()
    assert row is not None
    return SmsProviderConfig(tenant_id, url, row[0])


def get_sms_provider(conn: psycopg.Connection, tenant_id: str) -> SmsProviderConfig:
    """A tenant's own SMS gateway, without its token (UnknownSmsProvider)."""
    row = conn.execute(
        "SELECT tenant_id, url, updated_at FROM alert_sms_providers WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    if row is None:
        raise UnknownSmsProvider(
            f"tenant {tenant_id!r} has no SMS gateway of its own: its texts go through its parent's, or the "
            "deployment's (SENSORMINE_SMS_URL); PUT /api/alerts/sms-provider sets one"
        )
    return SmsProviderConfig(*row)


def delete_sms_provider(conn: psycopg.Connection, tenant_id: str) -> None:
    """Remove a tenant's SMS gateway (UnknownSmsProvider)."""
    if conn.execute("DELETE FROM alert_sms_providers WHERE tenant_id = %s", (tenant_id,)).rowcount == 0:
        raise UnknownSmsProvider(f"tenant {tenant_id!r} has no SMS gateway of its own")


def sms_gateway_of(
    tenant_id: str, gateways: dict[str, SmsProviderConfig], parents: dict[str, str | None]
) -> SmsProviderConfig | None:
    """The gateway a tenant's texts go through: its own, else the nearest ancestor's; None: the deployment's."""
    seen: set[str] = set()
    at: str | None = tenant_id
    while at is not None and at not in seen:
        if at in gateways:
            return gateways[at]
        seen.add(at)
        at = parents.get(at)
    return None


class Level(BaseModel):
    """One escalation level: its channels, notified `after_s` seconds after the raise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    after_s: float = Field(ge=0, le=30 * 86_400)
    channels: list[str] = Field(min_length=1, max_length=10)


class PolicySpec(BaseModel):
    """The levels and reminders of a policy, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    levels: list[Level] = Field(min_length=1, max_length=10)
    repeat_s: float | None = Field(None, ge=60, description="Reminders at the last level reached, until acknowledged")

    @model_validator(mode="after")
    def _ordered(self) -> PolicySpec:
        delays = [lv.after_s for lv in self.levels]
        if delays != sorted(delays) or len(set(delays)) != len(delays):
            raise ValueError("levels must come later one after the other (after_s strictly increasing)")
        return self


@dataclass(frozen=True)
class Policy:
    """A stored escalation policy."""

    tenant_id: str
    id: str
    name: str
    spec: PolicySpec
    created_at: datetime | None = None


def parse_policy(levels: Any, repeat_s: Any) -> PolicySpec:
    """A policy's levels from their JSON form (RuleError naming what is wrong)."""
    try:
        return PolicySpec.model_validate({"levels": levels, "repeat_s": repeat_s})
    except ValueError as exc:
        raise RuleError(f"invalid escalation policy: {exc}") from None


def insert_policy(conn: psycopg.Connection, tenant_id: str, policy_id: str, name: str, spec: PolicySpec) -> Policy:
    """Store a policy; its channels must exist in the tenant (RuleError, DuplicateChannel)."""
    if not RULE_ID.match(policy_id):
        raise RuleError(f"policy id {policy_id!r}: 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit")
    known = {c.id for c in list_channels(conn, tenant_id)}
    missing = sorted({c for lv in spec.levels for c in lv.channels} - known)
    if missing:
        raise RuleError(
            f"unknown channels {missing} in tenant {tenant_id!r}: create them first (POST /api/alerts/channels)"
        )
    try:
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO escalation_policies (tenant_id, id, name, levels, repeat_s) VALUES (%s, %s, %s, %s, %s) "
                "RETURNING created_at",
                (tenant_id, policy_id, name, Jsonb([lv.model_dump() for lv in spec.levels]), spec.repeat_s),
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise DuplicateChannel(f"tenant {tenant_id!r} already has a policy {policy_id!r}") from None
    assert row is not None
    return Policy(tenant_id, policy_id, name, spec, row[0])


def list_policies(conn: psycopg.Connection, tenant_id: str | None = None) -> list[Policy]:
    """A tenant's policies (every visible one when None)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT tenant_id, id, name, levels, repeat_s, created_at FROM escalation_policies "
            "WHERE %(t)s::text IS NULL OR tenant_id = %(t)s ORDER BY tenant_id, id",
            {"t": tenant_id},
        ).fetchall()
    return [
        Policy(r["tenant_id"], r["id"], r["name"], parse_policy(r["levels"], r["repeat_s"]), r["created_at"])
        for r in rows
    ]


def get_policy(conn: psycopg.Connection, tenant_id: str, policy_id: str) -> Policy:
    """One policy (UnknownChannel)."""
    for p in list_policies(conn, tenant_id):
        if p.id == policy_id:
            return p
    raise UnknownChannel(f"policy {policy_id!r} not found in tenant {tenant_id!r}; GET /api/alerts/policies")


def delete_policy(conn: psycopg.Connection, tenant_id: str, policy_id: str) -> None:
    """Delete a policy (UnknownChannel); rules naming it notify only their direct recipients."""
    deleted = conn.execute("DELETE FROM escalation_policies WHERE tenant_id = %s AND id = %s", (tenant_id, policy_id))
    if deleted.rowcount == 0:
        raise UnknownChannel(f"policy {policy_id!r} not found in tenant {tenant_id!r}")


@dataclass(frozen=True)
class Step:
    """What escalation does now: notify `level` (a new level, or a reminder of it) and when it is next due."""

    level: int
    reminder: bool
    next_at: datetime | None


def first_step(spec: PolicySpec, raised: datetime) -> Step:
    """At the raise: level 1 at once when its delay is 0 (level 0: nothing sent yet), and the next due time."""
    if spec.levels[0].after_s == 0:
        return Step(1, False, next_due(spec, 1, raised, raised))
    return Step(0, False, raised + timedelta(seconds=spec.levels[0].after_s))


def next_due(spec: PolicySpec, level: int, raised: datetime, now: datetime) -> datetime | None:
    """When the step after `level` (notified at `now`) is due: the next level, else a reminder, else never."""
    if level < len(spec.levels):
        return raised + timedelta(seconds=spec.levels[level].after_s)
    return now + timedelta(seconds=spec.repeat_s) if spec.repeat_s else None


def due_step(spec: PolicySpec, level: int, raised: datetime, now: datetime) -> Step:
    """The step of an alarm at `level` whose next notification is due at `now`."""
    if level < len(spec.levels):
        return Step(level + 1, False, next_due(spec, level + 1, raised, now))
    return Step(level, True, next_due(spec, level, raised, now))
