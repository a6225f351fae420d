"""Where the stream processor's time goes, without a profiler: `bench.streamproc` with wall-clock timers
around each phase of `StreamProcessor.process` and Python's cycle collector timed per generation.

Run with `uv run python -m bench.streamproc_phases [--trials 1]` after `sensormine services up` (the
arguments are bench.streamproc's). The timers wrap whole calls (about 20 a trial each), so they cost
nothing measurable, unlike cProfile, which inflates every Python call. The phases count only inside
`process` (the in-memory reference's own engine calls are left out); the collector's figures cover
the whole run, set-up and reference included. Figures: docs/benchmarks.md ("Results after the
collector and pipeline pass").
"""

from __future__ import annotations

import gc
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import bench.streamproc as streamproc_bench
from ingest_daemons import streamproc
from sensormine.alerts import processor
from sensormine.alerts.engine import Engine
from sensormine.alerts.windows import Windows

SECONDS: Counter[str] = Counter()
COUNTS: Counter[str] = Counter()


INSIDE = [0]  # > 0 while StreamProcessor.process runs (the in-memory reference calls the engine too)


def timed(label: str, f: Callable[..., Any], outer: bool = False) -> Callable[..., Any]:
    """`f`, adding its wall-clock time to SECONDS[label] when called inside `process` (`outer`: it is `process`)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        INSIDE[0] += outer
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            if INSIDE[0] > 0:
                SECONDS[label] += time.perf_counter() - t0
            INSIDE[0] -= outer

    return wrapper


def instrument() -> None:
    """Wrap the phases (methods and the module-level functions the processor calls) and time the collector."""
    process = streamproc.StreamProcessor.process
    streamproc.StreamProcessor.process = timed("StreamProcessor.process (total)", process, outer=True)  # type: ignore[method-assign]
    for owner, name, label in (
        (streamproc.StreamProcessor, "_publish_aggregates", "publish window aggregates"),
        (streamproc.StreamProcessor, "_publish", "publish alarm events (+ flush)"),
        (streamproc.StreamProcessor, "_rejected", "schema screen"),
        (Windows, "add", "windows"),
        (processor.Directory, "watching", "per-envelope rule index"),
        (Engine, "observe_many", "rule evaluation (Engine)"),
        (processor.AlarmProcessor, "_run", "evaluate + store (total)"),
    ):
        setattr(owner, name, timed(label, getattr(owner, name)))
    processor.apply_transitions = timed("store transitions (PostgreSQL)", processor.apply_transitions)
    streamproc.decode_envelope = timed("decode", streamproc.decode_envelope)
    started: list[float] = []

    def collector(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            SECONDS[f"cycle collector, generation {info['generation']}"] += time.perf_counter() - started.pop()
            COUNTS[f"cycle collector, generation {info['generation']}"] += 1

    gc.callbacks.append(collector)


def main(argv: list[str] | None = None) -> None:
    """Instrument, run bench.streamproc (one trial unless told), print the phase totals."""
    args = list(sys.argv[1:] if argv is None else argv)
    instrument()
    streamproc_bench.main(args if "--trials" in args else ["--trials", "1", *args])
    print("\nmeasured: wall-clock totals of whole calls over the run (the cold path, as bench.streamproc)")
    for label in sorted(SECONDS):
        runs = f"  ({COUNTS[label]} runs)" if label in COUNTS else ""
        print(f"{label:<44}{SECONDS[label]:9.2f} s{runs}", flush=True)


if __name__ == "__main__":
    main()
