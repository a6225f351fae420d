"""Alarm rules: what to watch (scope), when it is wrong (condition), how bad it is (severity).

A rule belongs to a tenant and applies to its devices and, unless `cascade` is off, to the devices
of its sub-tenants; a sub-tenant overrides an inherited rule by having one of the same name (a
disabled one switches it off there). The scope picks devices by id, by device type or by labels
(device metadata). Conditions:

- `threshold`: one metric `gt` / `lt` a value, or `between` / `outside` [low, high], with
  hysteresis: once true, it stays true until the value is back past the limit by `hysteresis`;
- `rate`: the metric's rate of change per second (between its last two readings) `gt` / `lt` a
  value (`absolute` compares the magnitude), with hysteresis the same way;
- `absence`: the device sent nothing for `after_s` seconds (its last message as the ingest paths
  recorded it in `device_status`, or its registration when it never sent one); evaluated on a
  timer from the stored state, not only when data comes;
- `anomaly`: the metric's anomaly score (the ONNX model of the device's type, scored on the stream
  by `sensormine.anomaly.stream.StreamScorer`) above a limit, with hysteresis;
- `all` / `any`: AND / OR of threshold, rate and anomaly conditions over metrics of one device
  (each metric's latest value holds until the next one).

`for_s` on the rule is a duration: the condition must hold (in event time) that long before the
alarm is raised ("above 90 for 5 minutes"). The evaluator is `sensormine.alerts.engine`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SEVERITIES = ("critical", "major", "minor", "warning", "info")
Severity = Literal["critical", "major", "minor", "warning", "info"]
RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class RuleError(ValueError):
    """A rule that cannot be evaluated as written (the message says what to change)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(_Strict):
    """The metric's latest value compared with a limit (or a band), with hysteresis."""

    kind: Literal["threshold"] = "threshold"
    metric: str = Field(min_length=1, max_length=256)
    op: Literal["gt", "lt", "between", "outside"]
    value: float | None = Field(None, description="The limit for gt / lt")
    low: float | None = Field(None, description="The band's low end for between / outside")
    high: float | None = Field(None, description="The band's high end for between / outside")
    hysteresis: float = Field(0.0, ge=0, description="How far back past the limit before it clears")

    @model_validator(mode="after")
    def _limits(self) -> Threshold:
        if self.op in ("gt", "lt"):
            if self.value is None or self.low is not None or self.high is not None:
                raise ValueError(f"op {self.op!r} takes `value` (not low/high)")
        elif self.low is None or self.high is None or self.value is not None or self.low > self.high:
            raise ValueError(f"op {self.op!r} takes `low` <= `high` (not value)")
        if (
            self.op == "outside"
            and self.high is not None
            and self.low is not None
            and (2 * self.hysteresis > self.high - self.low)
        ):
            raise ValueError("hysteresis of an `outside` band must be at most half its width")
        return self

    def describe(self) -> str:
        """The condition as people write it."""
        if self.op == "gt":
            return f"{self.metric} > {self.value:g}"
        if self.op == "lt":
            return f"{self.metric} < {self.value:g}"
        word = "between" if self.op == "between" else "outside"
        return f"{self.metric} {word} {self.low:g} and {self.high:g}"

    def holds(self, x: float, latched: bool) -> bool:
        """Whether the condition holds for value `x`, given whether it held before (hysteresis)."""
        h = self.hysteresis if latched else 0.0
        if self.op == "gt":
            return x > self.value - h  # type: ignore[operator]
        if self.op == "lt":
            return x < self.value + h  # type: ignore[operator]
        lo, hi = self.low, self.high
        assert lo is not None and hi is not None
        if self.op == "between":
            return lo - h <= x <= hi + h
        return x < lo + h or x > hi - h


class Rate(_Strict):
    """The metric's rate of change per second between its last two readings, against a limit."""

    kind: Literal["rate"] = "rate"
    metric: str = Field(min_length=1, max_length=256)
    op: Literal["gt", "lt"]
    per_s: float = Field(description="Units per second")
    absolute: bool = Field(False, description="Compare the rate's magnitude (rises and falls alike)")
    hysteresis: float = Field(0.0, ge=0)

    def describe(self) -> str:
        """The condition as people write it."""
        rate = f"|d {self.metric}/dt|" if self.absolute else f"d {self.metric}/dt"
        return f"{rate} {'>' if self.op == 'gt' else '<'} {self.per_s:g}/s"

    def holds(self, rate: float, latched: bool) -> bool:
        """Whether the condition holds for `rate`, given whether it held before."""
        r = abs(rate) if self.absolute else rate
        h = self.hysteresis if latched else 0.0
        return r > self.per_s - h if self.op == "gt" else r < self.per_s + h


class Anomaly(_Strict):
    """The metric's anomaly score (the ONNX model of the device's type, sensormine.anomaly) above a limit."""

    kind: Literal["anomaly"] = "anomaly"
    metric: str = Field(min_length=1, max_length=256)
    above: float = Field(0.6, gt=0, lt=1, description="Score limit; ordinary points score about 0.4-0.5")
    hysteresis: float = Field(0.0, ge=0, lt=1)

    def describe(self) -> str:
        """The condition as people write it."""
        return f"anomaly score of {self.metric} > {self.above:g}"

    def holds(self, score: float, latched: bool) -> bool:
        """Whether the condition holds for `score`, given whether it held before."""
        return score > self.above - (self.hysteresis if latched else 0.0)


Leaf = Annotated[Threshold | Rate | Anomaly, Field(discriminator="kind")]


class Combined(_Strict):
    """AND (`all`) or OR (`any`) of threshold, rate and anomaly conditions over the metrics of one device."""

    kind: Literal["all", "any"]
    conditions: list[Leaf] = Field(min_length=1, max_length=16)

    def describe(self) -> str:
        """The condition as people write it."""
        return f" {'AND' if self.kind == 'all' else 'OR'} ".join(f"({c.describe()})" for c in self.conditions)


class Absence(_Strict):
    """No message from the device for `after_s` seconds (by arrival time)."""

    kind: Literal["absence"] = "absence"
    after_s: float = Field(gt=0, le=30 * 86_400)

    def describe(self) -> str:
        """The condition as people write it."""
        return f"no data for {self.after_s:g} s"


Condition = Annotated[Threshold | Rate | Anomaly | Combined | Absence, Field(discriminator="kind")]
AnyCondition = Threshold | Rate | Anomaly | Combined | Absence
CONDITION = TypeAdapter(Condition)


class Scope(_Strict):
    """Which devices a rule watches: all of them by default; else by ids, by type, and/or by labels."""

    devices: list[str] | None = Field(None, max_length=1000, description="These device ids only")
    device_type: str | None = Field(None, description="Devices of this type only")
    labels: dict[str, Any] | None = Field(None, description="Devices whose metadata has these key/values")

    def matches(self, device_id: str, device_type: str | None, metadata: Mapping[str, Any]) -> bool:
        """Whether a device is in scope."""
        if self.devices is not None and device_id not in self.devices:
            return False
        if self.device_type is not None and device_type != self.device_type:
            return False
        return not self.labels or all(metadata.get(k) == v for k, v in self.labels.items())


class Notify(_Strict):
    """Who is told when the rule's alarm is raised or cleared."""

    emails: list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$", max_length=320)]] = Field(
        default_factory=list, max_length=50
    )


def leaves(condition: AnyCondition) -> list[Threshold | Rate | Anomaly]:
    """The threshold, rate and anomaly parts of a condition (none for absence)."""
    if isinstance(condition, Combined):
        return list(condition.conditions)
    return [condition] if isinstance(condition, Threshold | Rate | Anomaly) else []


def scored_metrics(condition: AnyCondition) -> set[str]:
    """The metrics whose anomaly scores a condition reads."""
    return {leaf.metric for leaf in leaves(condition) if isinstance(leaf, Anomaly)}


def metrics_of(condition: AnyCondition) -> set[str]:
    """The metrics whose readings a condition reads (none for absence)."""
    return {leaf.metric for leaf in leaves(condition)}


@dataclass(frozen=True)
class Rule:
    """A stored rule."""

    tenant_id: str
    id: str
    name: str
    severity: str
    condition: AnyCondition
    scope: Scope
    for_s: float = 0.0
    enabled: bool = True
    cascade: bool = True
    notify: Notify = field(default_factory=Notify)
    policy_id: str | None = None  # an escalation policy of the rule's tenant
    description: str = ""
    revision: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @cached_property
    def reads(self) -> frozenset[str]:
        """The metrics whose readings the condition reads (`metrics_of`, computed once)."""
        return frozenset(metrics_of(self.condition))

    @cached_property
    def leaves(self) -> tuple[Threshold | Rate | Anomaly, ...]:
        """The condition's parts (`leaves`, computed once; none for absence)."""
        return tuple(leaves(self.condition))

    @cached_property
    def any_of(self) -> bool:
        """Whether one part holding is enough (an `any` combination)."""
        return isinstance(self.condition, Combined) and self.condition.kind == "any"

    @cached_property
    def for_us(self) -> int:
        """`for_s` in microseconds."""
        return int(self.for_s * 1_000_000)

    @cached_property
    def by_instant(self) -> bool:
        """Whether the condition reads several metrics, so it is decided once per instant (the engine)."""
        return len(self.reads) > 1

    def describe(self) -> str:
        """The whole condition, with its duration."""
        text = self.condition.describe()
        return f"{text} for {self.for_s:g} s" if self.for_s else text


def parse_condition(value: Any) -> AnyCondition:
    """A condition from its JSON form (RuleError naming what is wrong)."""
    try:
        return CONDITION.validate_python(value)
    except ValueError as exc:
        raise RuleError(f"invalid condition: {exc}") from None


def parse_scope(value: Any) -> Scope:
    """A scope from its JSON form (RuleError naming what is wrong)."""
    try:
        return Scope.model_validate(value or {})
    except ValueError as exc:
        raise RuleError(f"invalid scope: {exc}") from None


def parse_notify(value: Any) -> Notify:
    """Notification targets from their JSON form (RuleError naming what is wrong)."""
    try:
        return Notify.model_validate(value or {})
    except ValueError as exc:
        raise RuleError(f"invalid notify: {exc}") from None


def check_rule(rule_id: str, name: str, severity: str, for_s: float, condition: Any) -> None:
    """Refuse what a rule may not be (RuleError)."""
    if not RULE_ID.match(rule_id):
        raise RuleError(f"rule id {rule_id!r}: 1-64 of A-Z a-z 0-9 _ -, starting with a letter or digit")
    if not name.strip() or len(name) > 200:
        raise RuleError("a rule needs a name of 1-200 characters")
    if severity not in SEVERITIES:
        raise RuleError(f"severity {severity!r}: one of {', '.join(SEVERITIES)}")
    if not 0 <= for_s <= 7 * 86_400:
        raise RuleError("for_s: 0 to 604800 seconds")
    if isinstance(condition, Absence) and for_s:
        raise RuleError("an absence condition has its own duration (after_s); leave for_s at 0")


def applicable(rules: list[Rule], ancestry: Mapping[str, list[str]]) -> dict[str, list[Rule]]:
    """The enabled rules that apply to each tenant of `ancestry` (tenant -> itself, its parent, ..., root).

    A tenant's own rules come first; an ancestor's rule applies when it cascades and no nearer
    tenant has a rule of the same name (enabled or not).
    """
    by_tenant: dict[str, list[Rule]] = {}
    for r in rules:
        by_tenant.setdefault(r.tenant_id, []).append(r)
    out: dict[str, list[Rule]] = {}
    for tenant, chain in ancestry.items():
        seen: set[str] = set()
        chosen: list[Rule] = []
        for depth, owner in enumerate(chain):
            for r in by_tenant.get(owner, []):
                if r.name in seen:
                    continue
                seen.add(r.name)
                if r.enabled and (depth == 0 or r.cascade):
                    chosen.append(r)
        out[tenant] = chosen
    return out
