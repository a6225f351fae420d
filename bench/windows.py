"""Stream windows alone: `Windows.add` in memory, the same readings shape as bench.streamproc.

Run with `uv run python -m bench.windows [--trials 5]`; needs no services.

1,000,000 readings: 1,000 devices x 10 metrics, 100 sampling rounds 30 s apart in event time, fed
in batches of 50,000 (about the stream processor's batch), into 60 s tumbling windows with 10 s
grace: about 2 readings per window, so most batches close a window of most series. Timed: the
`add` calls, i.e. folding readings in and building the closed windows' aggregates (not publishing
them). No ceiling: this is a cost breakdown of bench.streamproc's phase (b), not a ratio. Medians
of `--trials`, each on a fresh `Windows`.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sensormine.alerts.windows import Windows
from sensormine.reading import Reading

S = 1_000_000


def workload() -> list[Reading]:
    return [
        Reading("t1", f"d{d}", f"m{m}", 1_700_000_000 * S + rnd * 30 * S, float(m))
        for rnd in range(100)
        for d in range(1000)
        for m in range(10)
    ]


def trial(readings: list[Reading], batch: int = 50_000) -> tuple[float, int]:
    windows = Windows(width_s=60, grace_s=10)
    closed = 0
    t0 = time.perf_counter()
    for i in range(0, len(readings), batch):
        closed += len(windows.add(readings[i : i + batch]))
    return time.perf_counter() - t0, closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    readings = workload()
    runs = [trial(readings) for _ in range(args.trials)]
    seconds = statistics.median(s for s, _ in runs)
    print(
        f"Windows.add: {len(readings):,} readings, {runs[0][1]:,} windows closed; median of {args.trials}: "
        f"{len(readings) / seconds:,.0f} readings/s, {seconds / len(readings) * 1e6:.2f} us a reading",
        flush=True,
    )


if __name__ == "__main__":
    main()
