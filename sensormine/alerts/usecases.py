"""Alert use cases shared by the REST API and the command line: rules and people's actions on alarms.

Each runs under the actor's row-level-security scope, writes, and records its audit entry in the
same transaction; alarm actions also land in the alarm's own history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import psycopg

from sensormine.alerts import channels, store
from sensormine.alerts.rules import Rule, RuleError, check_rule, parse_condition, parse_notify, parse_scope
from sensormine.audit import log as audit

RULE_FIELDS = (
    "name",
    "severity",
    "condition",
    "scope",
    "for_s",
    "enabled",
    "cascade",
    "notify",
    "policy_id",
    "description",
)


def _build(tenant_id: str, rule_id: str, fields: Mapping[str, Any]) -> Rule:
    condition = parse_condition(fields["condition"])
    rule = Rule(
        tenant_id=tenant_id,
        id=rule_id,
        name=str(fields.get("name") or rule_id),
        severity=str(fields.get("severity", "major")),
        condition=condition,
        scope=parse_scope(fields.get("scope")),
        for_s=float(fields.get("for_s") or 0),
        enabled=bool(fields.get("enabled", True)),
        cascade=bool(fields.get("cascade", True)),
        notify=parse_notify(fields.get("notify")),
        policy_id=fields.get("policy_id") or None,
        description=str(fields.get("description") or ""),
    )
    check_rule(rule.id, rule.name, rule.severity, rule.for_s, rule.condition)
    return rule


def draft_rule(tenant_id: str, fields: Mapping[str, Any]) -> Rule:
    """A rule as it would be stored, not saved (dry runs). Raises RuleError."""
    return _build(tenant_id, "draft", {**fields, "name": fields.get("name") or "draft"})


def _check_policy(conn: psycopg.Connection, rule: Rule) -> None:
    if rule.policy_id is not None:
        try:
            channels.get_policy(conn, rule.tenant_id, rule.policy_id)
        except channels.UnknownChannel as exc:
            raise RuleError(f"{exc}: a rule escalates through a policy of its own tenant") from None


def rule_detail(rule: Rule) -> dict[str, Any]:
    """A rule as JSON (audit entries, API answers)."""
    return {
        "name": rule.name,
        "severity": rule.severity,
        "condition": rule.condition.model_dump(mode="json", exclude_none=True),
        "scope": rule.scope.model_dump(mode="json", exclude_none=True),
        "for_s": rule.for_s,
        "enabled": rule.enabled,
        "cascade": rule.cascade,
        "notify": rule.notify.model_dump(mode="json"),
        "policy_id": rule.policy_id,
        "description": rule.description,
    }


def create_rule(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, rule_id: str, fields: Mapping[str, Any]
) -> Rule:
    """Add a rule to a tenant. Raises RuleError (bad rule), DuplicateRule."""
    rule = _build(tenant_id, rule_id, fields)
    with actor.scope(conn, write=True):
        _check_policy(conn, rule)
        stored = store.insert_rule(conn, rule)
        audit.record(conn, actor, tenant_id, "alert_rule.create", "alert_rule", rule_id, rule_detail(stored))
    return stored


def change_rule(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, rule_id: str, changes: Mapping[str, Any]
) -> Rule:
    """Change some of a rule's fields (a new revision; the evaluator picks it up). Raises UnknownRule, RuleError."""
    unknown = set(changes) - set(RULE_FIELDS)
    if unknown:
        raise ValueError(f"unknown rule fields {sorted(unknown)}")
    with actor.scope(conn, write=True):
        before = store.get_rule(conn, tenant_id, rule_id)
        merged = {**rule_detail(before), **changes}
        rule = replace(_build(tenant_id, rule_id, merged), revision=before.revision)
        _check_policy(conn, rule)
        after = store.replace_rule(conn, rule)
        old, new = rule_detail(before), rule_detail(after)
        diff = {k: {"from": old[k], "to": new[k]} for k in RULE_FIELDS if old[k] != new[k]}
        audit.record(conn, actor, tenant_id, "alert_rule.update", "alert_rule", rule_id, diff)
    return after


def remove_rule(conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, rule_id: str) -> None:
    """Delete a rule; its alarms stay in the history. Raises UnknownRule."""
    with actor.scope(conn, write=True):
        store.delete_rule(conn, tenant_id, rule_id)
        audit.record(conn, actor, tenant_id, "alert_rule.delete", "alert_rule", rule_id)


def act_on_alarm(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    alarm_id: str,
    action: str,
    detail: Mapping[str, Any] | None = None,
) -> store.Alarm:
    """acknowledge | clear | comment | assign an alarm. Raises UnknownAlarm."""
    kind = {"acknowledge": "acknowledged", "clear": "cleared", "comment": "commented", "assign": "assigned"}[action]
    with actor.scope(conn, write=True):
        alarm = store.act_on_alarm(conn, tenant_id, alarm_id, kind, actor.subject, dict(detail or {}))
        audit.record(conn, actor, tenant_id, f"alarm.{action}", "alarm", alarm_id, dict(detail or {}))
    return alarm


def create_channel(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, channel_id: str, kind: str, targets: list[str]
) -> channels.Channel:
    """Add a notification channel; a webhook's signing secret is in the answer, this once.

    Raises RuleError (bad targets), DuplicateChannel."""
    with actor.scope(conn, write=True):
        made = channels.insert_channel(conn, tenant_id, channel_id, kind, targets)
        audit.record(conn, actor, tenant_id, "alert_channel.create", "alert_channel", channel_id,
                     {"kind": kind, "targets": targets})  # fmt: skip
    return made


def remove_channel(conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, channel_id: str) -> None:
    """Delete a channel. Raises UnknownChannel."""
    with actor.scope(conn, write=True):
        channels.delete_channel(conn, tenant_id, channel_id)
        audit.record(conn, actor, tenant_id, "alert_channel.delete", "alert_channel", channel_id)


def set_sms_provider(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, url: str, token: str
) -> channels.SmsProviderConfig:
    """Set (or replace) the tenant's own SMS gateway; its sub-tenants use it unless they have theirs.

    The token is stored for the notifier and never shown or audited. Raises RuleError."""
    with actor.scope(conn, write=True):
        made = channels.set_sms_provider(conn, tenant_id, url, token)
        audit.record(conn, actor, tenant_id, "alert_sms_provider.set", "alert_sms_provider", tenant_id, {"url": url})
    return made


def remove_sms_provider(conn: psycopg.Connection, actor: audit.Actor, tenant_id: str) -> None:
    """Remove the tenant's own SMS gateway (its texts go through its parent's, or the deployment's).
    Raises UnknownSmsProvider."""
    with actor.scope(conn, write=True):
        channels.delete_sms_provider(conn, tenant_id)
        audit.record(conn, actor, tenant_id, "alert_sms_provider.delete", "alert_sms_provider", tenant_id)


def create_policy(
    conn: psycopg.Connection,
    actor: audit.Actor,
    tenant_id: str,
    policy_id: str,
    name: str,
    levels: Any,
    repeat_s: float | None,
) -> channels.Policy:
    """Add an escalation policy over the tenant's channels. Raises RuleError, DuplicateChannel."""
    spec = channels.parse_policy(levels, repeat_s)
    with actor.scope(conn, write=True):
        made = channels.insert_policy(conn, tenant_id, policy_id, name or policy_id, spec)
        audit.record(conn, actor, tenant_id, "escalation_policy.create", "escalation_policy", policy_id,
                     {"levels": [lv.model_dump() for lv in spec.levels], "repeat_s": spec.repeat_s})  # fmt: skip
    return made


def remove_policy(conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, policy_id: str) -> None:
    """Delete an escalation policy. Raises UnknownChannel."""
    with actor.scope(conn, write=True):
        channels.delete_policy(conn, tenant_id, policy_id)
        audit.record(conn, actor, tenant_id, "escalation_policy.delete", "escalation_policy", policy_id)
