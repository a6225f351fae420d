"""Train the bundled demo model `sensormine/anomaly/models/motor.onnx` on simulated motors.

`python -m ingest_daemons.simulators.train_anomaly_demo` samples `signals.MotorSignal` (the
simulators' motors, with their occasional bearing knocks) once a second for a few hours, computes
the anomaly features exactly as the platform does, trains the device type `motor`'s model and
writes it with its card (`motor.json`). Deterministic: the same arguments give the same bytes.
It lives beside the simulators because the core (`sensormine.anomaly`) may not import them.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

import sensormine.anomaly
from ingest_daemons.simulators.signals import MotorSignal
from sensormine.anomaly.features import WINDOW, table_features
from sensormine.anomaly.model import train
from sensormine.reading import Reading, datetime_to_us, readings_to_table

START = datetime(2026, 1, 1, tzinfo=UTC)  # simulated time: fixed, so the output is reproducible
OUT_DIR = Path(sensormine.anomaly.__file__).parent / "models"


def simulated_readings(motors: int, hours: float, step_s: float = 1.0) -> pa.Table:
    """`motors` MotorSignals (seeds 0..motors-1) sampled every `step_s` for `hours`, as readings."""
    rows: list[Reading] = []
    start_us = datetime_to_us(START)
    steps = int(hours * 3600 / step_s)
    for seed in range(motors):
        signal = MotorSignal(seed)
        for i in range(steps):
            t = i * step_s
            ts = start_us + int(t * 1_000_000)
            for metric, value in signal.sample(START.timestamp() + t).items():
                rows.append(Reading("demo", f"motor-{seed + 1}", metric, ts, value, 0, ts))
    return readings_to_table(rows)


def main() -> None:
    """Command line: write motor.onnx and motor.json (to sensormine/anomaly/models/ by default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--motors", type=int, default=4)
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    table = simulated_readings(args.motors, args.hours)
    _, features = table_features(table)
    end = START + timedelta(hours=args.hours)
    model = train("motor", features, START, end, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "motor.onnx").write_bytes(model.onnx)
    card = {
        "device_type": model.device_type,
        "features": list(model.features),
        "window_readings": WINDOW,
        "training_rows": model.training_rows,
        "training_window": f"{START.isoformat()}/{end.isoformat()} (simulated)",
        "source": f"ingest_daemons.simulators.signals.MotorSignal seeds 0..{args.motors - 1}, 1 s samples",
        "command": f"python -m ingest_daemons.simulators.train_anomaly_demo --motors {args.motors} "
        f"--hours {args.hours} --seed {args.seed}",
        "sha256": model.sha256,
        "metrics": model.metrics,
    }
    (args.out / "motor.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"{model.training_rows} feature rows -> {args.out / 'motor.onnx'} ({len(model.onnx)} bytes), {model.metrics}")


if __name__ == "__main__":
    main()
