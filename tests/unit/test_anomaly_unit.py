"""Anomaly features and the ONNX model, without services."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime
from importlib import resources

import numpy as np
import pytest

from ingest_daemons.simulators.train_anomaly_demo import simulated_readings
from sensormine.anomaly.features import FEATURES, WINDOW, SeriesState, stream_features, table_features
from sensormine.anomaly.model import OnnxScorer, train
from sensormine.anomaly.registry import bundled_models
from sensormine.reading import Reading, readings_to_table
from tests.factories import DAY_US


def mixed_readings(n: int = 400, seed: int = 3) -> list[Reading]:
    """Interleaved series of two tenants: noise, a constant stretch, spikes, uneven spacing."""
    rng = random.Random(seed)
    out: list[Reading] = []
    ts = {
        key: DAY_US
        for key in [("acme", "m1", "temp"), ("acme", "m1", "rpm"), ("acme", "m2", "temp"), ("globex", "m1", "temp")]
    }
    for i in range(n):
        key = rng.choice(list(ts))
        ts[key] += rng.choice([250_000, 1_000_000, 1_000_000, 7_000_000])
        value = 1.0 if 50 <= i < 120 and key[2] == "temp" else rng.gauss(20, 2)
        if rng.random() < 0.02:
            value *= 5
        out.append(Reading(*key, ts[key], value))
    return out


def incremental(readings: list[Reading]) -> dict[tuple[str, str, str, int], np.ndarray]:
    """Features computed one reading at a time, in arrival order."""
    states: dict[tuple[str, str, str], SeriesState] = {}
    out = {}
    for r in readings:
        state = states.setdefault((r.tenant_id, r.device_id, r.metric), SeriesState())
        out[r.key] = stream_features([state], [r.ts], [r.value])[0]
    return out


def test_incremental_and_batch_features_are_identical() -> None:
    readings = mixed_readings()
    ordered, batch = table_features(readings_to_table(readings))
    assert batch.shape == (len(readings), len(FEATURES))
    keys = list(
        zip(
            ordered["tenant_id"].to_pylist(),
            ordered["device_id"].to_pylist(),
            ordered["metric"].to_pylist(),
            ordered["ts"].cast("int64").to_pylist(),
            strict=True,
        )
    )
    stream = incremental(readings)
    got = np.stack([stream[k] for k in keys])
    assert np.array_equal(got, batch)  # bit for bit, not within a tolerance
    assert np.isfinite(batch).all()


def test_features_follow_their_definitions() -> None:
    values = [float(v) for v in range(1, WINDOW + 6)]
    readings = [Reading("acme", "d", "m", DAY_US + i * 2_000_000, v) for i, v in enumerate(values)]
    _, f = table_features(readings_to_table(readings))
    first = dict(zip(FEATURES, f[0], strict=True))
    assert first == {"rolling_mean": 1.0, "rolling_std": 0.0, "zscore": 0.0, "rate_per_s": 0.0}
    last = dict(zip(FEATURES, f[-1], strict=True))
    window = np.array(values[-WINDOW - 1 : -1])
    assert last["rolling_mean"] == pytest.approx(window.mean())
    assert last["rolling_std"] == pytest.approx(window.std())
    assert last["zscore"] == pytest.approx((values[-1] - window.mean()) / window.std())
    assert last["rate_per_s"] == pytest.approx(0.5)  # +1 every 2 s
    # A jump out of a constant stretch: std 0 would make the z-score infinite; it is clipped instead.
    flat = [Reading("acme", "d", "m", DAY_US + i, 5.0 if i < 10 else 50.0) for i in range(11)]
    _, g = table_features(readings_to_table(flat))
    assert g[-1][2] == 0.0 and g[-2][2] == 0.0  # std 0 -> z 0 (nothing to compare against)


@pytest.fixture(scope="module")
def demo_scorer() -> OnnxScorer:
    return OnnxScorer(bundled_models()["motor"].onnx)


def test_the_bundled_demo_model_matches_its_card_and_finds_the_simulated_knocks(demo_scorer: OnnxScorer) -> None:
    model = bundled_models()["motor"]
    card = json.loads(resources.files("sensormine.anomaly.models").joinpath("motor.json").read_text())
    card_sha = card["sha256"]
    assert hashlib.sha256(model.onnx).hexdigest() == card_sha
    assert len(model.onnx) < 1_000_000
    assert demo_scorer.features == FEATURES and demo_scorer.device_type == "motor"
    # Fresh motors (other seeds than the training's): a bearing knock scores above the ordinary points.
    table = simulated_readings(2, 1.0)
    ordered, f = table_features(table)
    scores = demo_scorer.score(f)
    assert scores.dtype == np.float32 and scores.shape == (ordered.num_rows,)
    assert ((scores > 0) & (scores <= 1)).all()
    knock = (np.array(ordered["metric"].to_pylist()) == "vibration") & (f[:, 2] > 6)
    assert knock.sum() > 0
    assert np.median(scores[knock]) > np.quantile(scores[~knock], 0.95)


def test_scorer_refuses_the_wrong_shape_and_converts_float64(demo_scorer: OnnxScorer) -> None:
    with pytest.raises(ValueError, match="expected an"):
        demo_scorer.score(np.zeros((3, 2), dtype=np.float32))
    x = np.random.default_rng(0).normal(size=(5, len(FEATURES)))
    assert np.array_equal(demo_scorer.score(x), demo_scorer.score(x.astype(np.float32)))
    assert demo_scorer.score(np.zeros((0, len(FEATURES)))).shape == (0,)


def test_onnx_scores_equal_scikit_learn_scores() -> None:
    x = np.random.default_rng(1).normal(size=(2000, len(FEATURES)))
    now = datetime.now(UTC)
    model = train("pump", x, now, now, seed=1)
    assert model.metrics["max_abs_diff_sklearn"] < 1e-5
    assert OnnxScorer(model.onnx).device_type == "pump"
