"""Rule semantics, table-driven: each condition kind, hysteresis, duration, late readings, absence."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sensormine.alerts.engine import Engine, absence_transitions
from sensormine.alerts.rules import Rule, RuleError, Scope, applicable, check_rule, parse_condition
from sensormine.reading import Reading

S = 1_000_000  # microseconds per second


def rule(condition: dict[str, Any], for_s: float = 0, **kw: Any) -> Rule:
    return Rule(
        "acme", kw.pop("id", "r1"), kw.pop("name", "r1"), "major", parse_condition(condition), Scope(), for_s, **kw
    )


def run(r: Rule, points: list[tuple[str, int, float]]) -> list[str]:
    """The transitions, as 'kind@second', of readings (metric, second, value) of one device."""
    engine = Engine()
    out = []
    for metric, sec, value in points:
        out += [f"{t.kind}@{t.ts_us // S}" for t in engine.observe([r], Reading("acme", "d1", metric, sec * S, value))]
    return out


def series(*values: float, metric: str = "t") -> list[tuple[str, int, float]]:
    return [(metric, i, v) for i, v in enumerate(values)]


CASES = [
    # (condition, for_s, readings, transitions)
    (
        {"kind": "threshold", "metric": "t", "op": "gt", "value": 90},
        0,
        series(80, 91, 95, 89, 92),
        ["raise@1", "update@2", "clear@3", "raise@4"],
    ),
    # hysteresis 5: 88 stays up (> 85), 84 clears; 88 again does not re-raise (not > 90)
    (
        {"kind": "threshold", "metric": "t", "op": "gt", "value": 90, "hysteresis": 5},
        0,
        series(91, 88, 84, 88, 91),
        ["raise@0", "update@1", "clear@2", "raise@4"],
    ),
    (
        {"kind": "threshold", "metric": "t", "op": "lt", "value": 10, "hysteresis": 2},
        0,
        series(9, 11, 13),
        ["raise@0", "update@1", "clear@2"],
    ),
    (
        {"kind": "threshold", "metric": "t", "op": "between", "low": 10, "high": 20},
        0,
        series(5, 15, 20, 21),
        ["raise@1", "update@2", "clear@3"],
    ),
    (
        {"kind": "threshold", "metric": "t", "op": "outside", "low": 10, "high": 20, "hysteresis": 1},
        0,
        series(15, 21, 19.5, 18.9),
        ["raise@1", "update@2", "clear@3"],
    ),
    # duration: above 90 for 3 s, in event time; a dip resets it
    (
        {"kind": "threshold", "metric": "t", "op": "gt", "value": 90},
        3,
        series(91, 92, 80, 91, 92, 93, 94, 80),
        ["raise@6", "clear@7"],
    ),
    # rate of change per second (readings 1 s apart)
    ({"kind": "rate", "metric": "t", "op": "gt", "per_s": 5}, 0, series(0, 1, 10, 11), ["raise@2", "clear@3"]),
    (
        {"kind": "rate", "metric": "t", "op": "gt", "per_s": 5, "absolute": True},
        0,
        series(20, 10, 9),
        ["raise@1", "clear@2"],
    ),
    # OR across metrics: either metric over its limit
    (
        {
            "kind": "any",
            "conditions": [
                {"kind": "threshold", "metric": "t", "op": "gt", "value": 90},
                {"kind": "threshold", "metric": "p", "op": "gt", "value": 5},
            ],
        },
        0,
        [("t", 0, 50), ("p", 1, 6), ("t", 2, 95), ("p", 3, 1), ("t", 4, 50)],
        ["raise@1", "update@2", "update@3", "clear@4"],
    ),
    # AND across metrics: the latest value of each holds until its next reading
    (
        {
            "kind": "all",
            "conditions": [
                {"kind": "threshold", "metric": "t", "op": "gt", "value": 90},
                {"kind": "threshold", "metric": "p", "op": "gt", "value": 5},
            ],
        },
        0,
        [("t", 0, 95), ("p", 1, 6), ("t", 2, 50), ("p", 3, 7)],
        ["raise@1", "clear@2"],
    ),
    # late readings (not newer than the latest of their metric) change nothing
    (
        {"kind": "threshold", "metric": "t", "op": "gt", "value": 90},
        0,
        [("t", 5, 95), ("t", 3, 10), ("t", 6, 80)],
        ["raise@5", "clear@6"],
    ),
    # readings of other metrics are not looked at
    ({"kind": "threshold", "metric": "t", "op": "gt", "value": 90}, 0, [("p", 0, 99), ("t", 1, 99)], ["raise@1"]),
]


@pytest.mark.parametrize(("condition", "for_s", "points", "want"), CASES)
def test_condition_semantics(condition: dict[str, Any], for_s: float, points: list, want: list[str]) -> None:
    assert run(rule(condition, for_s), points) == want


def test_absence_raises_after_the_silence_and_clears_when_the_device_speaks() -> None:
    r = rule({"kind": "absence", "after_s": 60})
    targets = [(r, "acme", "d1"), (r, "acme", "d2"), (r, "acme", "d3")]
    silent = {("acme", "d1"): 59.9, ("acme", "d2"): 60.0}  # d3: not registered (no row)
    raised = absence_transitions(targets, silent, set(), 5 * S)
    assert [(t.kind, t.device_id, t.ts_us) for t in raised] == [("raise", "d2", 5 * S)]
    key = ("acme", "r1", "acme", "d2")
    assert absence_transitions(targets, silent, {key}, 6 * S) == []  # open already: not again
    spoke = absence_transitions(targets, {("acme", "d2"): 1.0}, {key}, 7 * S)
    assert [(t.kind, t.device_id) for t in spoke] == [("clear", "d2")]


def test_a_restored_alarm_updates_and_clears_instead_of_raising_again() -> None:
    r = rule({"kind": "threshold", "metric": "t", "op": "gt", "value": 90, "hysteresis": 5})
    engine = Engine()
    engine.restore(r, "acme", "d1")
    kinds = [t.kind for i, v in enumerate((88, 84)) for t in engine.observe([r], Reading("acme", "d1", "t", i * S, v))]
    assert kinds == ["update", "clear"]  # 88 is inside the hysteresis band of a raised alarm


def test_readings_replayed_from_before_a_restored_alarm_was_raised_do_not_clear_it() -> None:
    r = rule({"kind": "any", "conditions": [{"kind": "threshold", "metric": "p", "op": "gt", "value": 8}]})
    engine = Engine()
    engine.restore(r, "acme", "d1", raised_us=15 * S)
    replayed = [("p", 10, 5.0), ("p", 15, 9.0), ("p", 16, 9.5), ("p", 17, 4.0)]
    kinds = [
        f"{t.kind}@{t.ts_us // S}"
        for metric, sec, v in replayed
        for t in engine.observe([r], Reading("acme", "d1", metric, sec * S, v))
    ]
    assert kinds == ["update@16", "clear@17"]  # 10 s is before the raise, 15 s is the raise itself


@pytest.mark.parametrize("order", [("p", "t"), ("t", "p")])
def test_a_condition_over_two_metrics_is_decided_once_per_instant_whatever_the_order(order: tuple[str, str]) -> None:
    r = rule(
        {
            "kind": "any",
            "conditions": [
                {"kind": "threshold", "metric": "p", "op": "gt", "value": 8},
                {"kind": "threshold", "metric": "t", "op": "lt", "value": 10},
            ],
        }
    )
    values = {0: {"p": 5.0, "t": 80.0}, 1: {"p": 5.0, "t": 5.0}, 2: {"p": 9.0, "t": 80.0}, 3: {"p": 5.0, "t": 80.0}}
    engine = Engine()
    got = engine.observe_many(
        (Reading("acme", "d1", m, sec * S, v[m]), (r,), None) for sec, v in values.items() for m in order
    )
    # At 2 s the temperature is back, the pressure high: still up (an update, not a clear and a raise).
    assert [(t.kind, t.ts_us // S, t.metric) for t in got] == [
        ("raise", 1, "t"),
        ("update", 2, "p"),
        ("clear", 3, order[-1]),
    ]


def test_the_same_reading_evaluated_again_has_the_same_event_id() -> None:
    r = rule({"kind": "threshold", "metric": "t", "op": "gt", "value": 90})
    a = Engine().observe([r], Reading("acme", "d1", "t", 7 * S, 95.0))
    b = Engine().observe([r], Reading("acme", "d1", "t", 7 * S, 95.0))
    assert a[0].event_id == b[0].event_id == "acme/r1/acme/d1/raise/7000000"


def test_an_edited_rule_keeps_an_alarm_up_until_the_new_condition_clears() -> None:
    engine = Engine()
    r = rule({"kind": "threshold", "metric": "t", "op": "gt", "value": 90})
    assert [t.kind for t in engine.observe([r], Reading("acme", "d1", "t", 1 * S, 95.0))] == ["raise"]
    edited = replace(
        r, condition=parse_condition({"kind": "threshold", "metric": "t", "op": "gt", "value": 99}), revision=2
    )
    assert [t.kind for t in engine.observe([edited], Reading("acme", "d1", "t", 2 * S, 95.0))] == ["clear"]


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"kind": "threshold", "metric": "t", "op": "gt"}, "takes `value`"),
        ({"kind": "threshold", "metric": "t", "op": "between", "low": 5, "high": 1}, "low"),
        ({"kind": "threshold", "metric": "t", "op": "outside", "low": 0, "high": 2, "hysteresis": 2}, "half its width"),
        ({"kind": "nope"}, "invalid condition"),
        ({"kind": "any", "conditions": []}, "invalid condition"),
        ({"kind": "threshold", "metric": "t", "op": "gt", "value": 1, "extra": 1}, "extra"),
    ],
)
def test_bad_conditions_say_what_is_wrong(condition: dict[str, Any], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_condition(condition)


def test_bad_rules_are_refused() -> None:
    absence = parse_condition({"kind": "absence", "after_s": 5})
    with pytest.raises(RuleError, match="severity"):
        check_rule("r", "n", "urgent", 0, absence)
    with pytest.raises(RuleError, match="after_s"):
        check_rule("r", "n", "major", 5, absence)
    with pytest.raises(RuleError, match="rule id"):
        check_rule("-bad", "n", "major", 0, absence)


def test_rules_cascade_to_sub_tenants_unless_overridden_or_not_cascading() -> None:
    base = {"kind": "threshold", "metric": "t", "op": "gt", "value": 90}
    hot = Rule("parent", "hot", "hot", "major", parse_condition(base), Scope())
    local = Rule("parent", "local", "local", "minor", parse_condition(base), Scope(), cascade=False)
    override = Rule("child", "hot2", "hot", "critical", parse_condition(base), Scope(), enabled=False)
    ancestry = {"parent": ["parent"], "child": ["child", "parent"], "other": ["other", "parent"]}
    got = applicable([hot, local, override], ancestry)
    assert [r.id for r in got["parent"]] == ["hot", "local"]
    assert got["child"] == []  # its own disabled "hot" switches the parent's off; "local" does not cascade
    assert [r.id for r in got["other"]] == ["hot"]


def test_scope_by_ids_type_and_labels() -> None:
    scope = Scope(device_type="press", labels={"site": "north"})
    assert scope.matches("d1", "press", {"site": "north", "line": 2})
    assert not scope.matches("d1", "press", {"site": "south"})
    assert not scope.matches("d1", "pump", {"site": "north"})
    assert Scope(devices=["d1"]).matches("d1", None, {}) and not Scope(devices=["d1"]).matches("d2", None, {})


def test_an_anomaly_condition_reads_the_readings_scores() -> None:
    r = rule({"kind": "anomaly", "metric": "vibration", "above": 0.6, "hysteresis": 0.05})
    engine = Engine()
    got = []
    for i, score in enumerate([0.4, 0.65, 0.58, 0.5, None, 0.7]):
        got += [f"{t.kind}@{i}" for t in engine.observe([r], Reading("acme", "d1", "vibration", i * S, 1.0), score)]
    # 0.58 stays up within the hysteresis; an unscored reading does not hold.
    assert got == ["raise@1", "update@2", "clear@3", "raise@5"]
