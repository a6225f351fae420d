"""Rules and alarms in PostgreSQL (migration 018): the rows, and the alarm lifecycle's writes.

Every function runs in the caller's transaction and role: API callers under row-level security
(reader / writer), the evaluator as `sensormine_alerts`. The lifecycle:

- an alarm is raised `active`, unacknowledged; repeats while it is up add to its `count` and keep
  the latest value; at most one alarm is open per (rule, device);
- the rule's condition clearing sets it `cleared`; a person may clear it earlier: it is then
  `latched` (still the open alarm of its rule and device, so repeats change nothing) until the
  condition clears, and only then can the rule raise a new alarm;
- acknowledging, commenting and assigning are independent of active/cleared;
- every change is an `alarm_events` row; the evaluator's carry its transition id, so evaluating
  the same reading again (a replay, a restart) adds nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from sensormine.alerts.channels import Policy, due_step, first_step
from sensormine.alerts.engine import Transition
from sensormine.alerts.rules import Rule, parse_condition, parse_notify, parse_scope
from sensormine.reading import us_to_datetime


class UnknownRule(LookupError):
    """No such rule in the tenant."""


class DuplicateRule(ValueError):
    """A rule id or name is taken in the tenant."""


class UnknownAlarm(LookupError):
    """No such alarm in the tenant."""


_RULE_COLUMNS = (
    "tenant_id, id, name, severity, condition, scope, for_s, enabled, cascade, notify, policy_id, description, "
    "revision, created_at, updated_at"
)


def _rule(row: dict[str, Any]) -> Rule:
    return Rule(
        tenant_id=row["tenant_id"],
        id=row["id"],
        name=row["name"],
        severity=row["severity"],
        condition=parse_condition(row["condition"]),
        scope=parse_scope(row["scope"]),
        for_s=row["for_s"],
        enabled=row["enabled"],
        cascade=row["cascade"],
        notify=parse_notify(row["notify"]),
        policy_id=row["policy_id"],
        description=row["description"],
        revision=row["revision"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _params(rule: Rule) -> dict[str, Any]:
    return {
        "tenant_id": rule.tenant_id,
        "id": rule.id,
        "name": rule.name,
        "severity": rule.severity,
        "condition": Jsonb(rule.condition.model_dump(mode="json", exclude_none=True)),
        "scope": Jsonb(rule.scope.model_dump(mode="json", exclude_none=True)),
        "for_s": rule.for_s,
        "enabled": rule.enabled,
        "cascade": rule.cascade,
        "notify": Jsonb(rule.notify.model_dump(mode="json")),
        "policy_id": rule.policy_id,
        "description": rule.description,
    }


def insert_rule(conn: psycopg.Connection, rule: Rule) -> Rule:
    """Store a new rule (DuplicateRule when its id or name is taken in the tenant)."""
    try:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "INSERT INTO alert_rules (tenant_id, id, name, severity, condition, scope, for_s, enabled, cascade, "
                "notify, policy_id, description) VALUES (%(tenant_id)s, %(id)s, %(name)s, %(severity)s, %(condition)s, "
                "%(scope)s, %(for_s)s, %(enabled)s, %(cascade)s, %(notify)s, %(policy_id)s, %(description)s) "
                f"RETURNING {_RULE_COLUMNS}",
                _params(rule),
            ).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        what = "name" if "name" in (exc.diag.constraint_name or "") else "id"
        value = rule.name if what == "name" else rule.id
        raise DuplicateRule(f"tenant {rule.tenant_id!r} already has a rule with {what} {value!r}") from None
    assert row is not None
    return _rule(row)


def replace_rule(conn: psycopg.Connection, rule: Rule) -> Rule:
    """Store a changed rule under a new revision (UnknownRule, DuplicateRule for a taken name)."""
    try:
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "UPDATE alert_rules SET name = %(name)s, severity = %(severity)s, condition = %(condition)s, "
                "scope = %(scope)s, for_s = %(for_s)s, enabled = %(enabled)s, cascade = %(cascade)s, "
                "notify = %(notify)s, policy_id = %(policy_id)s, description = %(description)s, "
                "revision = nextval('alert_rule_revisions') "
                f"WHERE tenant_id = %(tenant_id)s AND id = %(id)s RETURNING {_RULE_COLUMNS}",
                _params(rule),
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise DuplicateRule(f"tenant {rule.tenant_id!r} already has a rule named {rule.name!r}") from None
    if row is None:
        raise UnknownRule(f"rule {rule.id!r} not found in tenant {rule.tenant_id!r}")
    return _rule(row)


def get_rule(conn: psycopg.Connection, tenant_id: str, rule_id: str) -> Rule:
    """One rule (UnknownRule)."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE tenant_id = %s AND id = %s", (tenant_id, rule_id)
        ).fetchone()
    if row is None:
        raise UnknownRule(f"rule {rule_id!r} not found in tenant {tenant_id!r}; GET /api/alerts/rules lists them")
    return _rule(row)


def list_rules(
    conn: psycopg.Connection,
    tenants: Sequence[str] | None = None,
    after: tuple[str, str] | None = None,
    limit: int = 1000,
) -> list[Rule]:
    """Rules of `tenants` (every visible one when None), by tenant and id."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if tenants is not None:
        where.append("tenant_id = ANY(%s)")
        params.append(list(tenants))
    if after is not None:
        where.append("(tenant_id, id) > (%s, %s)")
        params += list(after)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_RULE_COLUMNS} FROM alert_rules WHERE {' AND '.join(where)} ORDER BY tenant_id, id LIMIT %s",
            (*params, limit),
        ).fetchall()
    return [_rule(r) for r in rows]


def delete_rule(conn: psycopg.Connection, tenant_id: str, rule_id: str) -> None:
    """Delete a rule; its alarms stay (UnknownRule)."""
    if conn.execute("DELETE FROM alert_rules WHERE tenant_id = %s AND id = %s", (tenant_id, rule_id)).rowcount == 0:
        raise UnknownRule(f"rule {rule_id!r} not found in tenant {tenant_id!r}")


@dataclass(frozen=True)
class Alarm:
    """One alarm, as stored."""

    tenant_id: str
    id: str
    rule_tenant_id: str
    rule_id: str
    rule_name: str
    severity: str
    condition_text: str
    device_id: str
    status: str
    acknowledged: bool
    latched: bool
    metric: str | None
    first_value: float | None
    last_value: float | None
    count: int
    raised_at: datetime
    last_at: datetime
    cleared_at: datetime | None
    cleared_by: str | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    assignee: str | None
    policy_tenant_id: str | None = None
    policy_id: str | None = None
    escalation_level: int = 0
    escalation_from: datetime | None = None
    next_notify_at: datetime | None = None


_ALARM_COLUMNS = ", ".join(Alarm.__dataclass_fields__)


def _alarm(row: dict[str, Any]) -> Alarm:
    return Alarm(**{**row, "id": str(row["id"])})


@dataclass(frozen=True)
class AlarmChange:
    """What to tell people: an alarm raised or cleared (repeats are not reported), escalated or reminded."""

    kind: str  # raised | cleared | escalated | reminder
    alarm: Alarm
    rule: Rule | None  # None: the rule is gone (escalation of an older alarm)
    level: int = 1


_OPEN = (
    "tenant_id = %(tenant)s AND rule_tenant_id = %(rule_tenant)s AND rule_id = %(rule)s AND device_id = %(device)s "
    "AND (status = 'active' OR latched)"
)


# A repeat while the alarm is up: count it and keep the latest value (never older than the stored one).
_SEEN = "SELECT event_id FROM alarm_events WHERE event_id = ANY(%s)"
_REPEAT = (
    "UPDATE alarms SET count = count + 1, last_value = %(value)s, last_at = %(at)s, metric = %(metric)s "
    f"WHERE {_OPEN} AND status = 'active' AND last_at < %(at)s"
)


def apply_transitions(
    conn: psycopg.Connection,
    transitions: Sequence[Transition],
    policies: Mapping[tuple[str, str], Policy] | None = None,
    now: datetime | None = None,
    outbox: bool = False,
) -> list[AlarmChange]:
    """Write the evaluator's transitions (as sensormine_alerts, in the caller's transaction).

    A raised alarm whose rule names one of `policies` starts its escalation at `now` (wall clock).
    `outbox`: each raise and clear is also queued in `alarm_outbox` for publication (`outbox_due`,
    `outbox_done`).
    """
    changes: list[AlarmChange] = []
    now = now or datetime.now(UTC)
    # Pipeline mode: statements whose result nothing reads (repeats, events) go out without waiting
    # for the server; only a raise or a clear waits for its row (and for what was queued before it).
    with conn.pipeline(), conn.cursor(row_factory=dict_row) as cur:
        # Raises and clears evaluated before (a replayed batch) are found in one query, not one each.
        ids = [t.event_id for t in transitions if t.kind != "update"]
        seen = (
            {row["event_id"] for row in cur.execute(_SEEN, (ids,)).fetchall()} if ids else set()  # type: ignore[arg-type]
        )
        for t in transitions:
            key = {"tenant": t.tenant_id, "rule_tenant": t.rule.tenant_id, "rule": t.rule.id, "device": t.device_id}
            at = us_to_datetime(t.ts_us)
            if t.kind == "update":
                # A repeat changes only an active open alarm, which the UPDATE's own condition picks:
                # no need to read the alarm first (one round trip per repeat instead of two).
                cur.execute(_REPEAT, {**key, "value": t.value, "at": at, "metric": t.metric})
                continue
            if t.event_id in seen:
                continue  # evaluated before
            seen.add(t.event_id)
            if t.kind == "raise":
                policy = (policies or {}).get((t.rule.tenant_id, t.rule.policy_id or ""))
                step = first_step(policy.spec, now) if policy is not None else None
                row = cur.execute(
                    "INSERT INTO alarms (tenant_id, id, rule_tenant_id, rule_id, rule_name, severity, condition_text, "
                    "device_id, status, metric, first_value, last_value, raised_at, last_at, policy_tenant_id, "
                    "policy_id, escalation_level, escalation_from, next_notify_at) VALUES "
                    "(%(tenant)s, %(id)s, %(rule_tenant)s, %(rule)s, %(name)s, %(severity)s, %(text)s, %(device)s, "
                    "'active', %(metric)s, %(value)s, %(value)s, %(at)s, %(at)s, %(ptenant)s, %(policy)s, %(level)s, "
                    "%(from)s, %(next)s) "
                    # Open already: raised by another process first (absence ticks run wherever a processor
                    # runs), or cleared by hand while the condition held (latched).
                    "ON CONFLICT (tenant_id, rule_tenant_id, rule_id, device_id) WHERE status = 'active' OR latched "
                    f"DO NOTHING RETURNING {_ALARM_COLUMNS}",
                    {
                        **key,
                        "id": uuid.uuid4(),
                        "name": t.rule.name,
                        "severity": t.rule.severity,
                        "text": t.rule.describe(),
                        "metric": t.metric,
                        "value": t.value,
                        "at": at,
                        "ptenant": policy.tenant_id if policy else None,
                        "policy": policy.id if policy else None,
                        "level": step.level if step else 0,
                        "from": now if policy else None,
                        "next": step.next_at if step else None,
                    },
                ).fetchone()
                if row is None:  # an active one counts this as a repeat; a latched one stays as it is
                    cur.execute(_REPEAT, {**key, "value": t.value, "at": at, "metric": t.metric})
                    continue
                _event(cur, row, "raised", "rule", t.event_id, {"value": t.value, "metric": t.metric}, outbox)
                changes.append(AlarmChange("raised", _alarm(row), t.rule))
            else:
                row = cur.execute(
                    "UPDATE alarms SET status = 'cleared', cleared_at = %(at)s, cleared_by = 'rule', "
                    f"last_value = %(value)s, next_notify_at = NULL WHERE {_OPEN} AND status = 'active' "
                    f"RETURNING {_ALARM_COLUMNS}",
                    {**key, "at": at, "value": t.value},
                ).fetchone()
                if row is None:  # cleared by hand before (or not open): the condition is over now
                    cur.execute(f"UPDATE alarms SET latched = false WHERE {_OPEN} AND status = 'cleared'", key)
                    continue
                _event(cur, row, "cleared", "rule", t.event_id, {"value": t.value, "metric": t.metric}, outbox)
                changes.append(AlarmChange("cleared", _alarm(row), t.rule))
    return changes


def _event(
    cur: Any,
    alarm: dict[str, Any],
    kind: str,
    actor: str,
    event_id: str | None,
    detail: dict,
    outbox: bool = False,
) -> None:
    insert = (
        "INSERT INTO alarm_events (tenant_id, alarm_id, kind, actor, event_id, detail) "
        "VALUES (%(tenant)s, %(alarm)s, %(kind)s, %(actor)s, %(event)s, %(detail)s)"
    )
    if outbox:  # the same statement queues it for publication
        insert = (
            f"WITH event AS ({insert}) INSERT INTO alarm_outbox (tenant_id, alarm_id, kind) "
            "VALUES (%(tenant)s, %(alarm)s, %(kind)s) ON CONFLICT DO NOTHING"
        )
    cur.execute(
        insert,
        {
            "tenant": alarm["tenant_id"],
            "alarm": alarm["id"],
            "kind": kind,
            "actor": actor,
            "event": event_id,
            "detail": Jsonb(detail),
        },
    )


def outbox_due(conn: psycopg.Connection, age_s: float, limit: int = 1000) -> list[AlarmChange]:
    """Alarm changes queued (or last taken) for publication at least `age_s` ago by the database's clock
    and not confirmed yet, oldest first; each counts an attempt and is due again `age_s` later, so
    processors sweeping at once never take the same ones."""
    with conn.cursor(row_factory=dict_row) as cur:
        queued = cur.execute(
            # Taken rows are due again only `age_s` later: another processor's sweep leaves them alone meanwhile.
            "UPDATE alarm_outbox o SET attempts = attempts + 1, due_at = now() FROM ("
            "  SELECT tenant_id, alarm_id, kind, due_at FROM alarm_outbox "
            "  WHERE due_at <= now() - make_interval(secs => %s) "
            "  ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED) due "
            "WHERE (o.tenant_id, o.alarm_id, o.kind) = (due.tenant_id, due.alarm_id, due.kind) "
            "RETURNING o.tenant_id, o.alarm_id, o.kind, due.due_at AS queued",
            (age_s, limit),
        ).fetchall()
        if not queued:
            return []
        rows = cur.execute(
            f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE (tenant_id, id) IN "
            "(SELECT * FROM unnest(%s::text[], %s::uuid[]))",
            ([q["tenant_id"] for q in queued], [q["alarm_id"] for q in queued]),
        ).fetchall()
    alarms = {(r["tenant_id"], r["id"]): _alarm(r) for r in rows}
    queued.sort(key=lambda q: q["queued"])
    return [AlarmChange(q["kind"], alarms[(q["tenant_id"], q["alarm_id"])], None) for q in queued]


def outbox_done(conn: psycopg.Connection, changes: Sequence[AlarmChange]) -> None:
    """Kafka confirmed these alarm changes: off the outbox."""
    if changes:
        conn.execute(
            "DELETE FROM alarm_outbox WHERE (tenant_id, alarm_id, kind) IN "
            "(SELECT * FROM unnest(%s::text[], %s::uuid[], %s::text[]))",
            ([c.alarm.tenant_id for c in changes], [c.alarm.id for c in changes], [c.kind for c in changes]),
        )


def open_alarm_times(conn: psycopg.Connection) -> dict[tuple[str, str, str, str], int]:
    """(rule tenant, rule, tenant, device) of every open alarm (up, or cleared by hand while its condition
    held) -> when it was raised (event time, µs)."""
    rows = conn.execute(
        "SELECT rule_tenant_id, rule_id, tenant_id, device_id, (extract(epoch FROM raised_at) * 1000000)::bigint "
        "FROM alarms WHERE status = 'active' OR latched"
    ).fetchall()
    return {(a, b, c, d): ts for a, b, c, d, ts in rows}


def get_alarm(conn: psycopg.Connection, tenant_id: str, alarm_id: str) -> Alarm:
    """One alarm (UnknownAlarm)."""
    try:
        uuid.UUID(alarm_id)
    except ValueError:
        raise UnknownAlarm(f"alarm {alarm_id!r} not found in tenant {tenant_id!r}") from None
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE tenant_id = %s AND id = %s", (tenant_id, alarm_id)
        ).fetchone()
    if row is None:
        raise UnknownAlarm(f"alarm {alarm_id!r} not found in tenant {tenant_id!r}; GET /api/alerts/alarms lists them")
    return _alarm(row)


@dataclass(frozen=True)
class AlarmFilter:
    """Which alarms to list."""

    status: str | None = None  # active | cleared
    acknowledged: bool | None = None
    severity: str | None = None
    device_id: str | None = None
    rule_id: str | None = None


def list_alarms(
    conn: psycopg.Connection,
    tenants: Sequence[str],
    filters: AlarmFilter = AlarmFilter(),
    after: tuple[str, str] | None = None,
    limit: int = 100,
) -> list[Alarm]:
    """Alarms of `tenants`, newest first (by raise time, then id)."""
    where: list[str] = ["tenant_id = ANY(%s)"]
    params: list[Any] = [list(tenants)]
    for column in ("status", "acknowledged", "severity", "device_id", "rule_id"):
        value = getattr(filters, column)
        if value is not None:
            where.append(f"{column} = %s")
            params.append(value)
    if after is not None:
        where.append("(raised_at, id) < (%s::timestamptz, %s::uuid)")
        params += list(after)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE {' AND '.join(where)} "
            "ORDER BY raised_at DESC, id DESC LIMIT %s",
            (*params, limit),
        ).fetchall()
    return [_alarm(r) for r in rows]


@dataclass(frozen=True)
class AlarmEvent:
    """One step of an alarm's history."""

    id: int
    at: datetime
    kind: str
    actor: str
    detail: dict[str, Any]


def alarm_history(conn: psycopg.Connection, tenant_id: str, alarm_id: str) -> list[AlarmEvent]:
    """An alarm's events, oldest first (UnknownAlarm)."""
    get_alarm(conn, tenant_id, alarm_id)
    rows = conn.execute(
        "SELECT id, at, kind, actor, detail FROM alarm_events WHERE tenant_id = %s AND alarm_id = %s ORDER BY id",
        (tenant_id, alarm_id),
    ).fetchall()
    return [AlarmEvent(*r) for r in rows]


def act_on_alarm(
    conn: psycopg.Connection, tenant_id: str, alarm_id: str, kind: str, actor: str, detail: dict[str, Any]
) -> Alarm:
    """A person's action on an alarm (acknowledged, cleared, commented, assigned) and its history row."""
    alarm = get_alarm(conn, tenant_id, alarm_id)
    sets = {
        "acknowledged": "acknowledged = true, acknowledged_at = now(), acknowledged_by = %(actor)s, "
        "next_notify_at = NULL",
        # Cleared by hand: latched while the rule still holds it up (docstring above).
        "cleared": "status = 'cleared', cleared_at = now(), cleared_by = %(actor)s, latched = (status = 'active'), "
        "next_notify_at = NULL",
        "assigned": "assignee = %(assignee)s",
        "commented": None,
    }[kind]
    changed = {
        "acknowledged": not alarm.acknowledged,
        "cleared": alarm.status == "active",
        "assigned": alarm.assignee != detail.get("assignee"),
        "commented": True,
    }[kind]
    if not changed:
        return alarm
    with conn.cursor(row_factory=dict_row) as cur:
        if sets is not None:
            cur.execute(
                f"UPDATE alarms SET {sets} WHERE tenant_id = %(tenant)s AND id = %(id)s",
                {"tenant": tenant_id, "id": alarm_id, "actor": actor, "assignee": detail.get("assignee")},
            )
        _event(cur, {"tenant_id": tenant_id, "id": alarm_id}, kind, actor, None, detail)
    return get_alarm(conn, tenant_id, alarm_id)


def due_escalations(
    conn: psycopg.Connection, policies: Mapping[tuple[str, str], Policy], now: datetime, limit: int = 1000
) -> list[tuple[Alarm, int, bool]]:
    """Advance every active, unacknowledged alarm whose next notification is due: (alarm, level, reminder).

    Rows are locked FOR NO KEY UPDATE SKIP LOCKED, so processors ticking at once never notify the same
    step twice, and a delivery being logged for an alarm (its foreign key share-locks the row) does not
    hide the alarm from the tick.
    """
    out: list[tuple[Alarm, int, bool]] = []
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_ALARM_COLUMNS} FROM alarms WHERE next_notify_at <= %s AND status = 'active' "
            "AND NOT acknowledged ORDER BY next_notify_at LIMIT %s FOR NO KEY UPDATE SKIP LOCKED",
            (now, limit),
        ).fetchall()
        for row in rows:
            policy = policies.get((row["policy_tenant_id"], row["policy_id"]))
            if policy is None:  # the policy is gone: nothing more to send
                cur.execute(
                    "UPDATE alarms SET next_notify_at = NULL WHERE tenant_id = %s AND id = %s",
                    (row["tenant_id"], row["id"]),
                )
                continue
            step = due_step(policy.spec, row["escalation_level"], row["escalation_from"] or now, now)
            updated = cur.execute(
                "UPDATE alarms SET escalation_level = %s, next_notify_at = %s WHERE tenant_id = %s AND id = %s "
                f"RETURNING {_ALARM_COLUMNS}",
                (step.level, step.next_at, row["tenant_id"], row["id"]),
            ).fetchone()
            assert updated is not None
            _event(cur, updated, "reminded" if step.reminder else "escalated", "policy", None, {"level": step.level})
            out.append((_alarm(updated), step.level, step.reminder))
    return out


def record_delivery(
    conn: psycopg.Connection,
    alarm: Alarm,
    state: str,
    level: int,
    channel: str,
    target: str,
    status: str,
    attempts: int,
    error: str | None,
) -> None:
    """One notification's outcome, in the delivery log."""
    conn.execute(
        "INSERT INTO alarm_deliveries (tenant_id, alarm_id, state, level, channel, target, status, attempts, error) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (alarm.tenant_id, alarm.id, state, level, channel, target, status, attempts, error),
    )


def list_deliveries(conn: psycopg.Connection, tenant_id: str, alarm_id: str) -> list[dict[str, Any]]:
    """An alarm's delivery log, oldest first (UnknownAlarm)."""
    get_alarm(conn, tenant_id, alarm_id)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, at, state, level, channel, target, status, attempts, error FROM alarm_deliveries "
            "WHERE tenant_id = %s AND alarm_id = %s ORDER BY id",
            (tenant_id, alarm_id),
        ).fetchall()
