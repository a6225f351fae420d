"""The rule engine alone, in memory: `Engine.observe_many` over bench.streamproc's workload.

Run with `uv run python -m bench.engine [--trials 5]`; no services needed. The rules (1,000 over 10
tenants, 6 a device) and the readings (1 M, of which 650 k are read by some rule) are
bench.streamproc's; each device's rules per metric are indexed once beforehand, as
`Directory.watching` does, so only the engine is timed, in batches of 50,000 readings as the stream
processor hands them over, with the cycle collector off (as the stream processor runs). A new
engine each trial: the cold path. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from bench.streamproc import DEVICE_TYPES, RULES_PER_TYPE, Workload, messages_of, rule_fields
from sensormine.alerts.engine import Engine
from sensormine.alerts.rules import Rule, parse_condition, parse_scope
from sensormine.reading import Reading

Item = tuple[Reading, list[Rule], None]


def watched_readings(workload: Workload) -> list[Item]:
    """Every reading some rule reads, with those rules (the per-device index built once)."""
    rules: dict[str, list[Rule]] = {}
    for tenant in workload.tenant_ids():
        for type_index in range(len(DEVICE_TYPES)):
            for k in range(RULES_PER_TYPE):
                rule_id, f = rule_fields(type_index, k)
                condition, scope = parse_condition(f["condition"]), parse_scope(f["scope"])
                rules.setdefault(tenant, []).append(
                    Rule(tenant, rule_id, f["name"], f["severity"], condition, scope, f["for_s"])
                )
    index: dict[tuple[str, str], dict[str, list[Rule]]] = {}
    for tenant, device, device_type, labels in workload.devices_of():
        by_metric: dict[str, list[Rule]] = {}
        for r in rules[tenant]:
            if r.scope.matches(device, device_type, labels):
                for m in sorted(r.reads):
                    by_metric.setdefault(m, []).append(r)
        index[(tenant, device)] = by_metric
    out: list[Item] = []
    for envelope in messages_of(workload):
        for r in envelope:
            found = index[(r.tenant_id, r.device_id)].get(r.metric)
            if found:
                out.append((r, found, None))
    return out


def main(argv: list[str] | None = None) -> None:
    """Build the workload, time `trials` cold runs, print the median."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    items = watched_readings(Workload(1_000_000, 10_000, 10))
    gc.disable()
    runs, transitions = [], 0
    for _ in range(args.trials):
        engine = Engine()
        t0 = time.perf_counter()
        transitions = sum(len(engine.observe_many(items[i : i + 50_000])) for i in range(0, len(items), 50_000))
        runs.append(time.perf_counter() - t0)
    gc.enable()
    median = statistics.median(runs)
    print("measured: the engine alone, in memory, cold (a new engine each trial), collector off")
    print(
        f"{len(items):,} watched readings, {transitions:,} transitions: median {median:.2f} s "
        f"({median / len(items) * 1e6:.2f} µs a reading; trials {', '.join(f'{x:.2f}' for x in runs)})"
    )


if __name__ == "__main__":
    main()
