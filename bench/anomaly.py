"""Anomaly scoring benchmark: `OnnxScorer` (the platform's path) against bare onnxruntime, same run.

Run with `uv run python -m bench.anomaly [--rows 100000 --trials 5 --threads 1]`; needs no services.

Both sides score the same float32 feature matrix (features of simulated motors, computed by
`sensormine.anomaly.features`, so the trees see realistic paths) with the bundled motor model:

- platform: `OnnxScorer.score(x)` per batch (shape and dtype checks, one `InferenceSession.run`,
  the (n, 1) output reshaped to (n,));
- ceiling: `InferenceSession.run(["anomaly_score"], {"features": x})` on a session built from the
  same bytes with the same `SessionOptions` (`model.session_options(threads)`).

Batches of 1, 64, 1,024 and 16,384 rows over the same rows in the same order; per trial each
batch size runs both sides, the side that goes first alternating. Figures are medians over the
trials (warm: sessions loaded, one batch run before timing). Cold is model load plus a first
one-row batch, for each side. The ratio is platform / ceiling rows per second; the target is >= 0.8.
Also printed, without a ceiling: `StreamScorer` readings per second (features one reading at a time
per series, one ONNX run per call of 256 readings).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from bench.common import say
from ingest_daemons.simulators.train_anomaly_demo import simulated_readings
from sensormine.anomaly.features import table_features
from sensormine.anomaly.model import INPUT_NAME, OUTPUT_NAME, OnnxScorer, session_options
from sensormine.anomaly.registry import bundled_models
from sensormine.anomaly.stream import StreamScorer
from sensormine.reading import Reading

BATCHES = (1, 64, 1024, 16384)
TARGET = 0.8


def _time(fn: Callable[[np.ndarray], object], x: np.ndarray, batch: int, rows: int) -> float:
    """Seconds to score the first `rows` rows of x in batches of `batch`."""
    start = time.perf_counter()
    for lo in range(0, rows, batch):
        fn(x[lo : lo + batch])
    return time.perf_counter() - start


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, both sides")
    args = parser.parse_args()

    say("simulating motors and computing features")
    table = simulated_readings(motors=4, hours=args.rows / (4 * 3 * 3600) + 0.01)
    ordered, features = table_features(table)
    x = np.ascontiguousarray(features[: args.rows], dtype=np.float32)
    rows = x.shape[0]
    model = bundled_models()["motor"].onnx

    t0 = time.perf_counter()
    scorer = OnnxScorer(model, threads=args.threads)
    scorer.score(x[:1])
    cold_platform = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = ort.InferenceSession(model, session_options(args.threads), providers=["CPUExecutionProvider"])
    session.run([OUTPUT_NAME], {INPUT_NAME: x[:1]})
    cold_bare = time.perf_counter() - t0
    assert np.array_equal(scorer.score(x[:1000]), session.run([OUTPUT_NAME], {INPUT_NAME: x[:1000]})[0].reshape(-1))

    def bare(b: np.ndarray) -> object:
        return session.run([OUTPUT_NAME], {INPUT_NAME: b})

    results: dict[int, tuple[list[float], list[float]]] = {b: ([], []) for b in BATCHES}
    for trial in range(args.trials):
        for batch in BATCHES:
            n = min(rows, 5_000) if batch == 1 else rows  # batch 1 is slow: fewer calls, same rate
            sides = [("platform", scorer.score), ("bare", bare)]
            if trial % 2:
                sides.reverse()
            for name, fn in sides:
                fn(x[:batch])  # warm
                rate = n / _time(fn, x, batch, n)
                results[batch][0 if name == "platform" else 1].append(rate)
        say(f"trial {trial + 1}/{args.trials} done")

    print(f"\nanomaly scoring, bundled motor model, {rows:,} feature rows, intra-op threads {args.threads}")
    print(f"ort {ort.__version__}; medians over {args.trials} trials, sides alternating\n")
    print(f"{'batch':>7} | {'OnnxScorer rows/s':>18} | {'bare ort rows/s':>16} | {'ratio':>6}")
    print("-" * 58)
    ratios = []
    for batch in BATCHES:
        p, b = statistics.median(results[batch][0]), statistics.median(results[batch][1])
        ratios.append(p / b)
        print(f"{batch:>7,} | {p:>18,.0f} | {b:>16,.0f} | {p / b:>6.3f}")
    print(f"\ncold (load + first row): OnnxScorer {cold_platform * 1e3:.1f} ms, bare session {cold_bare * 1e3:.1f} ms")

    types = {f"motor-{i}": "motor" for i in range(1, 5)}
    readings = [
        Reading("bench", d, m, ts, v)
        for d, m, ts, v in zip(
            ordered["device_id"].to_pylist()[:rows],
            ordered["metric"].to_pylist()[:rows],
            ordered["ts"].cast("int64").to_pylist()[:rows],
            ordered["value"].to_pylist()[:rows],
            strict=True,
        )
    ]
    readings.sort(key=lambda r: r.ts)  # arrival order: every series interleaved
    stream = StreamScorer({"motor": scorer}, lambda t, d: types.get(d))
    n = min(len(readings), 50_000)
    start = time.perf_counter()
    for lo in range(0, n, 256):
        stream.score(readings[lo : lo + 256])
    print(f"StreamScorer: {n / (time.perf_counter() - start):,.0f} readings/s (calls of 256 readings, 12 series)")

    worst = min(ratios)
    verdict = "PASS" if worst >= TARGET else "FAIL"
    print(f"\nverdict: {verdict} (lowest ratio {worst:.3f}, target >= {TARGET})")


if __name__ == "__main__":
    main()
