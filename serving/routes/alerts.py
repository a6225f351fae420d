"""Alerts: alarm rules (create, list, read, change, delete) and alarms (list, read, acknowledge, clear,
comment, assign, history, delivery log). docs/alerts.md has the semantics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, Security
from pydantic import BaseModel, ConfigDict, Field

from query.alerts import dry_run as replay_rule
from sensormine.alerts import channels, store, usecases
from sensormine.alerts.rules import RULE_ID, Rule, RuleError
from sensormine.alerts.store import AlarmFilter, DuplicateRule, UnknownAlarm, UnknownRule
from sensormine.reading import us_to_datetime
from serving.deps import Caller, ConnDep, SettingsDep, authenticate
from serving.pagination import Page, PageDep
from serving.problems import Problem

router = APIRouter(prefix="/api/alerts", tags=["alerts"])

Reader = Annotated[Caller, Security(authenticate, scopes=["alerts:read"])]
Writer = Annotated[Caller, Security(authenticate, scopes=["alerts:write"])]
TenantParam = Annotated[str | None, Query(description="A sub-tenant; the caller's own tenant by default")]
RuleId = Annotated[str, Path(description="The rule's id within its tenant", max_length=64)]
AlarmId = Annotated[str, Path(description="The alarm's id (a UUID)", max_length=64)]
Severity = Literal["critical", "major", "minor", "warning", "info"]

EXAMPLE_CONDITION = {"kind": "threshold", "metric": "temperature", "op": "gt", "value": 90, "hysteresis": 2}


class RuleIn(BaseModel):
    """A new rule."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="1-64 of A-Z a-z 0-9 _ -; unique within the tenant", examples=["overheat"])
    name: str | None = Field(
        None, description="Unique within the tenant; a sub-tenant's rule of the same name overrides an inherited one"
    )
    severity: Severity = "major"
    condition: dict[str, Any] = Field(
        description="threshold | rate | all | any | absence (docs/alerts.md)", examples=[EXAMPLE_CONDITION]
    )
    scope: dict[str, Any] = Field(
        default_factory=dict, description="devices (ids), device_type and/or labels (metadata key/values); all devices"
    )
    for_s: float = Field(0, ge=0, description="The condition must hold this long (event time) before the alarm")
    enabled: bool = True
    cascade: bool = Field(True, description="Also watch the devices of sub-tenants")
    notify: dict[str, Any] = Field(default_factory=dict, description='{"emails": [...]}: told on raise and clear')
    policy_id: str | None = Field(None, description="An escalation policy of the tenant (POST /api/alerts/policies)")
    description: str = ""


class RulePatch(BaseModel):
    """Fields to change; omitted fields are kept."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    severity: Severity | None = None
    condition: dict[str, Any] | None = None
    scope: dict[str, Any] | None = None
    for_s: float | None = Field(None, ge=0)
    enabled: bool | None = None
    cascade: bool | None = None
    notify: dict[str, Any] | None = None
    policy_id: str | None = None
    description: str | None = None


class RuleOut(BaseModel):
    """A stored rule."""

    tenant_id: str
    id: str
    name: str
    severity: str
    condition: dict[str, Any]
    condition_text: str = Field(description="The condition as people write it")
    scope: dict[str, Any]
    for_s: float
    enabled: bool
    cascade: bool
    notify: dict[str, Any]
    policy_id: str | None
    description: str
    revision: int
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, rule: Rule) -> RuleOut:
        """The answer for a stored rule."""
        return cls(
            tenant_id=rule.tenant_id,
            id=rule.id,
            revision=rule.revision,
            created_at=rule.created_at,
            updated_at=rule.updated_at,
            condition_text=rule.describe(),
            **usecases.rule_detail(rule),
        )


class AlarmOut(BaseModel):
    """An alarm: active or cleared, acknowledged or not."""

    tenant_id: str
    id: str
    rule_tenant_id: str = Field(description="The rule's tenant: this one or an ancestor it inherits from")
    rule_id: str
    rule_name: str
    severity: str
    condition_text: str
    device_id: str
    status: Literal["active", "cleared"]
    acknowledged: bool
    metric: str | None
    first_value: float | None
    last_value: float | None
    count: int = Field(description="Readings that met the condition while it was up")
    raised_at: datetime
    last_at: datetime
    cleared_at: datetime | None
    cleared_by: str | None = Field(description="'rule' when the condition cleared, else who cleared it")
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    assignee: str | None
    policy_id: str | None = Field(description="The escalation policy it follows")
    escalation_level: int = Field(description="The last level notified (0: none yet)")
    next_notify_at: datetime | None = Field(description="When the next level or reminder is due, if any")


class AlarmEventOut(BaseModel):
    """One step of an alarm's history."""

    id: int
    at: datetime
    kind: Literal["raised", "cleared", "acknowledged", "commented", "assigned", "escalated", "reminded"]
    actor: str
    detail: dict[str, Any]


class DeliveryOut(BaseModel):
    """One notification attempt's outcome."""

    id: int
    at: datetime
    state: str
    level: int
    channel: str
    target: str
    status: Literal["delivered", "failed", "dead"]
    attempts: int
    error: str | None


class CommentIn(BaseModel):
    """A comment on an alarm."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=4000)


class AssignIn(BaseModel):
    """Who handles an alarm (null: nobody)."""

    model_config = ConfigDict(extra="forbid")

    assignee: str | None = Field(max_length=320)


def _alarm_out(alarm: store.Alarm) -> AlarmOut:
    return AlarmOut(**{k: v for k, v in alarm.__dict__.items() if k in AlarmOut.model_fields})


def _rule_problem(exc: Exception) -> Problem:
    if isinstance(exc, UnknownRule):
        return Problem(404, str(exc))
    if isinstance(exc, DuplicateRule):
        return Problem(409, f"{exc}: choose another, or change the existing rule (PATCH /api/alerts/rules/{{id}})")
    return Problem(422, str(exc))


@router.post("/rules", response_model=RuleOut, status_code=201, responses={409: {}, 422: {}})
def create_rule(
    body: RuleIn, caller: Writer, conn: ConnDep, response: Response, tenant_id: TenantParam = None
) -> RuleOut:
    """Add a rule; the evaluator applies it within seconds, to the tenant's devices (with cascade, sub-tenants' too)."""
    tenant = caller.tenant(tenant_id)
    if not RULE_ID.match(body.id):
        raise Problem(422, f"rule id {body.id!r}: 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit")
    try:
        rule = usecases.create_rule(conn, caller, tenant, body.id, body.model_dump(exclude={"id"}))
    except (RuleError, DuplicateRule) as exc:
        raise _rule_problem(exc) from None
    response.headers["Location"] = f"/api/alerts/rules/{rule.id}"
    return RuleOut.of(rule)


MAX_EVENTS = 1000


class DryRunIn(BaseModel):
    """A rule to try on stored data (not saved), and how far back."""

    model_config = ConfigDict(extra="forbid")

    severity: Severity = "major"
    condition: dict[str, Any] = Field(examples=[EXAMPLE_CONDITION])
    scope: dict[str, Any] = Field(default_factory=dict)
    for_s: float = Field(0, ge=0)
    hours: float = Field(24, gt=0, le=31 * 24, description="Replay the last N hours")


class DryRunEvent(BaseModel):
    """One transition the rule would have made."""

    kind: Literal["raise", "update", "clear"]
    device_id: str
    ts: datetime
    metric: str | None
    value: float | None


class DryRunOut(BaseModel):
    """What the rule would have done."""

    devices: int = Field(description="Devices in the rule's scope")
    readings: int = Field(description="Stored readings replayed")
    fired: int = Field(description="How many times it would have raised an alarm")
    cleared: int
    events: list[DryRunEvent] = Field(description=f"Raises and clears, the first {MAX_EVENTS}")


@router.post("/rules/dry-run", response_model=DryRunOut, responses={422: {}})
def dry_run(
    body: DryRunIn, caller: Reader, conn: ConnDep, settings: SettingsDep, tenant_id: TenantParam = None
) -> DryRunOut:
    """Replay the last `hours` of the tenant's stored readings through a rule without saving it.

    Absence conditions count gaps between stored readings (arrival times are not stored).
    """
    tenant = caller.tenant(tenant_id)
    if not caller.can("telemetry:read"):
        raise Problem(403, "a dry run reads telemetry: the caller needs telemetry:read")
    try:
        rule = usecases.draft_rule(tenant, body.model_dump(exclude={"hours"}))
    except RuleError as exc:
        raise Problem(422, str(exc)) from None
    end = datetime.now(UTC)
    try:
        result = replay_rule(conn, settings, caller.visible, tenant, rule, end - timedelta(hours=body.hours), end)
    except ValueError as exc:
        raise Problem(422, str(exc)) from None
    shown = [t for t in result.transitions if t.kind != "update"]
    return DryRunOut(
        devices=result.devices,
        readings=result.readings,
        fired=result.raised,
        cleared=sum(t.kind == "clear" for t in shown),
        events=[
            DryRunEvent(kind=t.kind, device_id=t.device_id, ts=us_to_datetime(t.ts_us), metric=t.metric, value=t.value)
            for t in shown[:MAX_EVENTS]
        ],
    )


@router.get("/rules", response_model=Page[RuleOut])
def list_rules(caller: Reader, conn: ConnDep, page: PageDep, tenant_id: TenantParam = None) -> dict[str, Any]:
    """The tenant's own rules, by id (inherited ones are listed at their owner)."""
    tenant = caller.tenant(tenant_id)
    after = page.after
    if after is not None and not (isinstance(after, list) and len(after) == 2):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    with caller.scope(conn):
        rules = store.list_rules(conn, [tenant], tuple(after) if after else None, page.limit + 1)
    return page.page([RuleOut.of(r) for r in rules], key=lambda r: [r.tenant_id, r.id])


@router.get("/rules/{rule_id}", response_model=RuleOut)
def read_rule(rule_id: RuleId, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> RuleOut:
    """One rule."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return RuleOut.of(store.get_rule(conn, tenant, rule_id))
    except UnknownRule as exc:
        raise _rule_problem(exc) from None


@router.patch("/rules/{rule_id}", response_model=RuleOut)
def change_rule(
    rule_id: RuleId, body: RulePatch, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None
) -> RuleOut:
    """Change a rule (a new revision: an alarm already up stays up until the new condition clears it)."""
    tenant = caller.tenant(tenant_id)
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    if not changes or any(v is None for k, v in changes.items() if k != "policy_id"):
        raise Problem(422, "send the fields to change, none of them null (but policy_id: null drops the policy)")
    try:
        return RuleOut.of(usecases.change_rule(conn, caller, tenant, rule_id, changes))
    except (RuleError, DuplicateRule, UnknownRule) as exc:
        raise _rule_problem(exc) from None


@router.delete("/rules/{rule_id}", status_code=204)
def remove_rule(rule_id: RuleId, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Response:
    """Delete a rule; its alarms stay, with their history."""
    tenant = caller.tenant(tenant_id)
    try:
        usecases.remove_rule(conn, caller, tenant, rule_id)
    except UnknownRule as exc:
        raise _rule_problem(exc) from None
    return Response(status_code=204)


@router.get("/alarms", response_model=Page[AlarmOut])
def list_alarms(
    caller: Reader,
    conn: ConnDep,
    page: PageDep,
    tenant_id: TenantParam = None,
    status: Annotated[Literal["active", "cleared"] | None, Query()] = None,
    acknowledged: Annotated[bool | None, Query()] = None,
    severity: Annotated[Severity | None, Query()] = None,
    device_id: Annotated[str | None, Query()] = None,
    rule_id: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    """The tenant's alarms, newest first, filtered."""
    tenant = caller.tenant(tenant_id)
    after = page.after
    if after is not None and not (isinstance(after, list) and len(after) == 2):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged")
    filters = AlarmFilter(status, acknowledged, severity, device_id, rule_id)
    with caller.scope(conn):
        alarms = store.list_alarms(conn, [tenant], filters, tuple(after) if after else None, page.limit + 1)
    return page.page([_alarm_out(a) for a in alarms], key=lambda a: [a.raised_at.isoformat(), a.id])


@router.get("/alarms/{alarm_id}", response_model=AlarmOut)
def read_alarm(alarm_id: AlarmId, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> AlarmOut:
    """One alarm."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return _alarm_out(store.get_alarm(conn, tenant, alarm_id))
    except UnknownAlarm as exc:
        raise Problem(404, str(exc)) from None


@router.get("/alarms/{alarm_id}/history", response_model=list[AlarmEventOut])
def alarm_history(alarm_id: AlarmId, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> list[Any]:
    """What happened to an alarm, oldest first: raised, acknowledged, commented, assigned, cleared."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return [AlarmEventOut(**e.__dict__) for e in store.alarm_history(conn, tenant, alarm_id)]
    except UnknownAlarm as exc:
        raise Problem(404, str(exc)) from None


@router.get("/alarms/{alarm_id}/deliveries", response_model=list[DeliveryOut])
def alarm_deliveries(alarm_id: AlarmId, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> list[Any]:
    """Every notification sent for an alarm, and its outcome."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return [DeliveryOut(**d) for d in store.list_deliveries(conn, tenant, alarm_id)]
    except UnknownAlarm as exc:
        raise Problem(404, str(exc)) from None


def _act(caller: Caller, conn: Any, tenant_id: str | None, alarm_id: str, action: str, detail: dict) -> AlarmOut:
    tenant = caller.tenant(tenant_id)
    try:
        return _alarm_out(usecases.act_on_alarm(conn, caller, tenant, alarm_id, action, detail))
    except UnknownAlarm as exc:
        raise Problem(404, str(exc)) from None


@router.post("/alarms/{alarm_id}/acknowledge", response_model=AlarmOut)
def acknowledge(alarm_id: AlarmId, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> AlarmOut:
    """Acknowledge an alarm (again: no change)."""
    return _act(caller, conn, tenant_id, alarm_id, "acknowledge", {})


@router.post("/alarms/{alarm_id}/clear", response_model=AlarmOut)
def clear(alarm_id: AlarmId, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> AlarmOut:
    """Clear an alarm by hand. While its condition still holds, repeats do not raise it again."""
    return _act(caller, conn, tenant_id, alarm_id, "clear", {})


@router.post("/alarms/{alarm_id}/comment", response_model=AlarmOut)
def comment(
    alarm_id: AlarmId, body: CommentIn, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None
) -> AlarmOut:
    """Add a comment to an alarm's history."""
    return _act(caller, conn, tenant_id, alarm_id, "comment", {"text": body.text})


@router.post("/alarms/{alarm_id}/assign", response_model=AlarmOut)
def assign(alarm_id: AlarmId, body: AssignIn, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> AlarmOut:
    """Assign an alarm to someone (null: unassign)."""
    return _act(caller, conn, tenant_id, alarm_id, "assign", {"assignee": body.assignee})


class ChannelIn(BaseModel):
    """A notification channel."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(examples=["ops-email"])
    kind: Literal["email", "webhook", "sms"]
    targets: list[str] = Field(
        min_length=1, max_length=50, description="E-mail addresses; E.164 numbers; or the one webhook URL"
    )


class ChannelOut(BaseModel):
    """A channel (its webhook secret is shown only when it is made)."""

    tenant_id: str
    id: str
    kind: str
    targets: list[str]
    enabled: bool
    created_at: datetime | None


class ChannelCreated(ChannelOut):
    """A new channel; for a webhook, the secret its requests are signed with (docs/notifications.md)."""

    secret: str | None = Field(description="Shown once: store it now to verify X-Sensormine-Signature")


class LevelIn(BaseModel):
    """One level of a policy."""

    model_config = ConfigDict(extra="forbid")

    after_s: float = Field(ge=0, description="Seconds after the raise")
    channels: list[str] = Field(min_length=1)


class PolicyIn(BaseModel):
    """An escalation policy."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(examples=["on-call"])
    name: str | None = None
    levels: list[LevelIn] = Field(min_length=1, max_length=10)
    repeat_s: float | None = Field(None, description="Reminders at the last level reached until acknowledged")


class PolicyOut(BaseModel):
    """A stored policy."""

    tenant_id: str
    id: str
    name: str
    levels: list[dict[str, Any]]
    repeat_s: float | None
    created_at: datetime | None


def _channel_out(c: channels.Channel) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ("tenant_id", "id", "kind", "targets", "enabled", "created_at")}


def _policy_out(p: channels.Policy) -> PolicyOut:
    levels = [lv.model_dump() for lv in p.spec.levels]
    return PolicyOut(
        tenant_id=p.tenant_id, id=p.id, name=p.name, levels=levels, repeat_s=p.spec.repeat_s, created_at=p.created_at
    )


def _channel_problem(exc: Exception) -> Problem:
    if isinstance(exc, channels.UnknownChannel):
        return Problem(404, str(exc))
    if isinstance(exc, channels.DuplicateChannel):
        return Problem(409, str(exc))
    return Problem(422, str(exc))


@router.post("/channels", response_model=ChannelCreated, status_code=201, responses={409: {}, 422: {}})
def create_channel(body: ChannelIn, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> ChannelCreated:
    """Add a channel: e-mail addresses, SMS numbers, or a webhook URL (its signing secret is answered once)."""
    tenant = caller.tenant(tenant_id)
    try:
        made = usecases.create_channel(conn, caller, tenant, body.id, body.kind, body.targets)
    except (RuleError, channels.DuplicateChannel) as exc:
        raise _channel_problem(exc) from None
    return ChannelCreated(**_channel_out(made), secret=made.secret)


@router.get("/channels", response_model=list[ChannelOut])
def list_channels(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> list[Any]:
    """The tenant's channels (never their secrets)."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        return [_channel_out(c) for c in channels.list_channels(conn, tenant)]


@router.get("/channels/{channel_id}", response_model=ChannelOut)
def read_channel(channel_id: RuleId, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> Any:
    """One channel."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return _channel_out(channels.get_channel(conn, tenant, channel_id))
    except channels.UnknownChannel as exc:
        raise _channel_problem(exc) from None


@router.delete("/channels/{channel_id}", status_code=204)
def remove_channel(channel_id: RuleId, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Response:
    """Delete a channel; policies naming it skip it."""
    tenant = caller.tenant(tenant_id)
    try:
        usecases.remove_channel(conn, caller, tenant, channel_id)
    except channels.UnknownChannel as exc:
        raise _channel_problem(exc) from None
    return Response(status_code=204)


class SmsProviderIn(BaseModel):
    """The tenant's own SMS gateway: JSON over HTTP, POST {"to", "text"} with `Authorization: Bearer <token>`."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(examples=["https://sms.example.com/v1/messages"])
    token: str = Field(description="The gateway's bearer token: stored for sending, never shown again")


class SmsProviderOut(BaseModel):
    """The tenant's own SMS gateway (never its token)."""

    tenant_id: str
    url: str
    updated_at: datetime | None


def _sms_provider_problem(exc: Exception) -> Problem:
    return Problem(404 if isinstance(exc, channels.UnknownSmsProvider) else 422, str(exc))


@router.put("/sms-provider", response_model=SmsProviderOut, responses={422: {}})
def put_sms_provider(body: SmsProviderIn, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Any:
    """Send the tenant's SMS channels (and its sub-tenants', unless they set their own) through its own gateway."""
    tenant = caller.tenant(tenant_id)
    try:
        made = usecases.set_sms_provider(conn, caller, tenant, body.url, body.token)
    except RuleError as exc:
        raise _sms_provider_problem(exc) from None
    return vars(made)


@router.get("/sms-provider", response_model=SmsProviderOut, responses={404: {}})
def read_sms_provider(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> Any:
    """The tenant's own SMS gateway (404: its texts go through its parent's, or the deployment's)."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return vars(channels.get_sms_provider(conn, tenant))
    except channels.UnknownSmsProvider as exc:
        raise _sms_provider_problem(exc) from None


@router.delete("/sms-provider", status_code=204, responses={404: {}})
def remove_sms_provider(caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Response:
    """Remove the tenant's own SMS gateway: its texts go through its parent's, or the deployment's, again."""
    tenant = caller.tenant(tenant_id)
    try:
        usecases.remove_sms_provider(conn, caller, tenant)
    except channels.UnknownSmsProvider as exc:
        raise _sms_provider_problem(exc) from None
    return Response(status_code=204)


@router.post("/policies", response_model=PolicyOut, status_code=201, responses={409: {}, 422: {}})
def create_policy(body: PolicyIn, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> PolicyOut:
    """Add an escalation policy: levels of channels by delay after the raise, reminders until acknowledged."""
    tenant = caller.tenant(tenant_id)
    levels = [lv.model_dump() for lv in body.levels]
    try:
        made = usecases.create_policy(conn, caller, tenant, body.id, body.name or body.id, levels, body.repeat_s)
    except (RuleError, channels.DuplicateChannel) as exc:
        raise _channel_problem(exc) from None
    return _policy_out(made)


@router.get("/policies", response_model=list[PolicyOut])
def list_policies(caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> list[PolicyOut]:
    """The tenant's escalation policies."""
    tenant = caller.tenant(tenant_id)
    with caller.scope(conn):
        return [_policy_out(p) for p in channels.list_policies(conn, tenant)]


@router.get("/policies/{policy_id}", response_model=PolicyOut)
def read_policy(policy_id: RuleId, caller: Reader, conn: ConnDep, tenant_id: TenantParam = None) -> PolicyOut:
    """One escalation policy."""
    tenant = caller.tenant(tenant_id)
    try:
        with caller.scope(conn):
            return _policy_out(channels.get_policy(conn, tenant, policy_id))
    except channels.UnknownChannel as exc:
        raise _channel_problem(exc) from None


@router.delete("/policies/{policy_id}", status_code=204)
def remove_policy(policy_id: RuleId, caller: Writer, conn: ConnDep, tenant_id: TenantParam = None) -> Response:
    """Delete a policy; alarms following it get no more escalations."""
    tenant = caller.tenant(tenant_id)
    try:
        usecases.remove_policy(conn, caller, tenant, policy_id)
    except channels.UnknownChannel as exc:
        raise _channel_problem(exc) from None
    return Response(status_code=204)
