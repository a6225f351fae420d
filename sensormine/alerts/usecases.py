"""Alert use cases shared by the REST API and the command line: rules and people's actions on alarms.

Each runs under the actor's row-level-security scope, writes, and records its audit entry in the
same transaction; alarm actions also land in the alarm's own history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import psycopg

from sensormine.alerts import store
from sensormine.alerts.rules import Rule, check_rule, parse_condition, parse_notify, parse_scope
from sensormine.audit import log as audit

RULE_FIELDS = ("name", "severity", "condition", "scope", "for_s", "enabled", "cascade", "notify", "description")


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
        description=str(fields.get("description") or ""),
    )
    check_rule(rule.id, rule.name, rule.severity, rule.for_s, rule.condition)
    return rule


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
        "description": rule.description,
    }


def create_rule(
    conn: psycopg.Connection, actor: audit.Actor, tenant_id: str, rule_id: str, fields: Mapping[str, Any]
) -> Rule:
    """Add a rule to a tenant. Raises RuleError (bad rule), DuplicateRule."""
    rule = _build(tenant_id, rule_id, fields)
    with actor.scope(conn, write=True):
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
        after = store.replace_rule(conn, replace(_build(tenant_id, rule_id, merged), revision=before.revision))
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
