"""The rule evaluator: readings (and timer ticks) in, alarm transitions out. No I/O here.

State is kept per (rule, device): each threshold/rate part's latch (for hysteresis), the latest two
readings of each metric the rule reads, since when the condition holds (for `for_s`, in event
time), and whether the alarm is up. A device's readings arrive through one ingest path, so one
process holds its state. Absence rules keep no state here: `absence_transitions` decides from
the stored last-seen times and open alarms, so any number of processes may tick.

Readings of a metric older than (or as old as) the latest one seen for that device are late: they
change no state (the stored alarm history is not rewritten). A transition names its event time;
`Transition.event_id` is the same when the same reading is evaluated again, so a replay changes
nothing in the alarm store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sensormine.alerts.rules import Absence, Anomaly, Rule, Threshold
from sensormine.reading import Reading

Kind = Literal["raise", "update", "clear"]


@dataclass(frozen=True)
class Transition:
    """An alarm goes up, is seen again, or goes down, for one rule and one device."""

    kind: Kind
    rule: Rule
    tenant_id: str  # the device's tenant (the rule may be inherited from an ancestor)
    device_id: str
    ts_us: int  # event time: the reading's, or the tick's for absence
    metric: str | None = None
    value: float | None = None

    @property
    def event_id(self) -> str:
        """Stable across re-evaluations of the same reading or tick."""
        return f"{self.rule.tenant_id}/{self.rule.id}/{self.tenant_id}/{self.device_id}/{self.kind}/{self.ts_us}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(rule tenant, rule, device tenant, device): one open alarm per key."""
        return (self.rule.tenant_id, self.rule.id, self.tenant_id, self.device_id)


@dataclass(slots=True)
class _State:
    latched: list[bool]
    last: dict[str, tuple[int, float]] = field(default_factory=dict)
    prev: dict[str, tuple[int, float]] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # the latest reading's anomaly score per metric
    holding_since: int | None = None
    active: bool = False
    raised_at: int | None = None  # a restored alarm's raise (event time): older readings cannot clear it
    instant: list[tuple[int, str, float]] = field(default_factory=list)  # (ts, metric, value) taken, undecided
    revision: int = 0


class Engine:
    """Evaluates rules against readings; one instance per processing loop (not thread-safe)."""

    def __init__(self) -> None:
        self._states: dict[tuple[str, str, str, str], _State] = {}
        self._pending: dict[tuple[str, str, str, str], tuple[Rule, _State]] = {}  # instants to decide
        self.late = 0  # readings ignored as out of order

    def _state(self, rule: Rule, tenant_id: str, device_id: str) -> _State:
        key = (rule.tenant_id, rule.id, tenant_id, device_id)
        state = self._states.get(key)
        if state is None or state.revision != rule.revision:
            # A new or edited rule starts afresh, except that an alarm already up stays up until the
            # (new) condition no longer holds.
            active = state.active if state is not None else False
            state = _State(latched=[active] * len(rule.leaves), active=active, revision=rule.revision)
            self._states[key] = state
        return state

    def restore(self, rule: Rule, tenant_id: str, device_id: str, raised_us: int | None = None) -> None:
        """An alarm of this rule and device is open in the store (after a restart): its condition held.

        `raised_us`: when it was raised. Readings up to then (a replay of the hot store rebuilding
        the state) update the latest values but decide nothing: the alarm was not up yet then, and it
        was raised after them.
        """
        state = self._state(rule, tenant_id, device_id)
        state.active = True
        state.latched = [True] * len(state.latched)
        state.raised_at = raised_us

    def is_active(self, rule: Rule, tenant_id: str, device_id: str) -> bool:
        """Whether the engine holds this rule's alarm for the device as up."""
        state = self._states.get((rule.tenant_id, rule.id, tenant_id, device_id))
        return state is not None and state.active

    def observe(self, rules: Sequence[Rule], reading: Reading, score: float | None = None) -> list[Transition]:
        """Transitions caused by one reading under the rules that apply to its device.

        `score`: the reading's anomaly score, for anomaly conditions (None: not scored; such a
        condition then does not hold).
        """
        return self.observe_many([(reading, rules, score)])

    def observe_many(self, items: Iterable[tuple[Reading, Sequence[Rule], float | None]]) -> list[Transition]:
        """Transitions caused by readings (each with the rules that apply to its device and its score).

        A condition over several metrics is decided once per instant: the readings of one device at
        one time (an envelope's metrics) are all taken before it is evaluated, so their order does not
        matter. An instant is complete when a later reading of the device comes, or at the end of the
        call; readings of one instant split over two calls are decided twice (once per part).
        """
        out: list[Transition] = []
        states, pending = self._states, self._pending
        for r, rules, score in items:
            metric, ts, tenant_id, device_id = r.metric, r.ts, r.tenant_id, r.device_id
            for rule in rules:
                if metric not in rule.reads:  # absence reads none
                    continue
                key = (rule.tenant_id, rule.id, tenant_id, device_id)
                state = states.get(key)
                if state is None or state.revision != rule.revision:
                    state = self._state(rule, tenant_id, device_id)
                last = state.last
                seen = last.get(metric)
                if seen is not None and ts <= seen[0]:
                    self.late += 1
                    continue
                instant = rule.by_instant
                if instant and state.instant and state.instant[0][0] < ts:
                    t = self._decide(rule, state, tenant_id, device_id)  # the device's previous instant
                    if t is not None:
                        out.append(t)
                if seen is not None:
                    state.prev[metric] = seen
                last[metric] = (ts, r.value)
                if score is None:
                    if state.scores:
                        state.scores.pop(metric, None)
                else:
                    state.scores[metric] = score
                state.instant.append((ts, metric, r.value))
                if instant:
                    pending[key] = (rule, state)
                else:
                    t = self._decide(rule, state, tenant_id, device_id)
                    if t is not None:
                        out.append(t)
        if pending:
            self._pending = {}
            for key, (rule, state) in pending.items():
                t = self._decide(rule, state, key[2], key[3])
                if t is not None:
                    out.append(t)
        return out

    def _decide(self, rule: Rule, state: _State, tenant_id: str, device_id: str) -> Transition | None:
        """Evaluate the condition at the instant taken in (`state.instant`, then emptied)."""
        instant, state.instant = state.instant, []
        ts = instant[0][0]
        if state.raised_at is not None:
            if state.active and ts <= state.raised_at:
                return None  # up to the restored alarm's raise: its latches stay as they were then
            state.raised_at = None
        holds = self._holds(rule, state)
        # The reading the transition names: the instant's first whose part holds (the last one read when none does).
        _, metric, value = instant[-1]
        if holds and len(instant) > 1:
            held = {leaf.metric for leaf, up in zip(rule.leaves, state.latched, strict=True) if up}
            _, metric, value = next((x for x in instant if x[1] in held), instant[-1])
        if not holds:
            state.holding_since = None
            if state.active:
                state.active = False
                return Transition("clear", rule, tenant_id, device_id, ts, metric, value)
            return None
        if state.holding_since is None:
            state.holding_since = ts
        if state.active:
            return Transition("update", rule, tenant_id, device_id, ts, metric, value)
        if ts - state.holding_since >= rule.for_us:
            state.active = True
            return Transition("raise", rule, tenant_id, device_id, ts, metric, value)
        return None

    @staticmethod
    def _holds(rule: Rule, state: _State) -> bool:
        """Whether the condition holds now; every part's latch is updated (hysteresis)."""
        latched, last_of = state.latched, state.last
        held_any, held_all = False, True
        for i, leaf in enumerate(rule.leaves):
            result = False
            last = last_of.get(leaf.metric)
            if last is not None:
                if isinstance(leaf, Threshold):
                    result = leaf.holds(last[1], latched[i])
                elif isinstance(leaf, Anomaly):
                    scored = state.scores.get(leaf.metric)
                    result = scored is not None and leaf.holds(scored, latched[i])
                else:
                    prev = state.prev.get(leaf.metric)
                    if prev is not None and last[0] > prev[0]:
                        result = leaf.holds((last[1] - prev[1]) / ((last[0] - prev[0]) / 1_000_000), latched[i])
            latched[i] = result
            held_any |= result
            held_all &= result
        return held_any if rule.any_of else held_all


def absence_transitions(
    targets: Iterable[tuple[Rule, str, str]],
    silent_s: Mapping[tuple[str, str], float],
    open_keys: set[tuple[str, str, str, str]],
    now_us: int,
) -> list[Transition]:
    """Absence rules at `now_us`: (rule, tenant, device) targets, how long each device has been silent.

    Raises where the silence reached the rule's `after_s` and no alarm is open; clears an open one
    whose device has spoken since. Deciding from stored state makes it safe to run anywhere, any
    number of times: the store keeps one open alarm per rule and device.
    """
    out: list[Transition] = []
    for rule, tenant_id, device_id in targets:
        cond = rule.condition
        if not isinstance(cond, Absence):
            continue
        silent = silent_s.get((tenant_id, device_id))
        if silent is None:
            continue
        is_open = (rule.tenant_id, rule.id, tenant_id, device_id) in open_keys
        if silent >= cond.after_s and not is_open:
            out.append(Transition("raise", rule, tenant_id, device_id, now_us))
        elif silent < cond.after_s and is_open:
            out.append(Transition("clear", rule, tenant_id, device_id, now_us))
    return out


def replay(rule: Rule, readings: Sequence[Reading], scores: Sequence[float | None] | None = None) -> list[Transition]:
    """What `rule` would have done over stored readings (in event-time order per device): the dry run.

    Absence has no arrival times to go by here: a gap of at least `after_s` between two readings
    of a device counts as a raise `after_s` into the gap and a clear at the reading that ends it.
    """
    cond = rule.condition
    out: list[Transition] = []
    if not isinstance(cond, Absence):
        scored = scores if scores is not None else [None] * len(readings)
        return Engine().observe_many((r, (rule,), s) for r, s in zip(readings, scored, strict=True))
    last: dict[tuple[str, str], int] = {}
    gap_us = int(cond.after_s * 1_000_000)
    for r in readings:
        key = (r.tenant_id, r.device_id)
        prev = last.get(key)
        if prev is not None and r.ts - prev >= gap_us:
            out.append(Transition("raise", rule, r.tenant_id, r.device_id, prev + gap_us))
            out.append(Transition("clear", rule, r.tenant_id, r.device_id, r.ts, r.metric, r.value))
        if prev is None or r.ts > prev:
            last[key] = r.ts
    return out
