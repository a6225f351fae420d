"""The streaming scorer: the batch's scores, one reading at a time, metered per tenant."""

from __future__ import annotations

import numpy as np
import pytest

from sensormine.anomaly.features import table_features
from sensormine.anomaly.metering import InferenceMeter
from sensormine.anomaly.model import OnnxScorer
from sensormine.anomaly.registry import bundled_models
from sensormine.anomaly.stream import StreamScorer
from sensormine.reading import Reading, readings_to_table
from tests.factories import DAY_US
from tests.unit.test_anomaly_unit import mixed_readings


@pytest.fixture(scope="module")
def demo_scorer() -> OnnxScorer:
    return OnnxScorer(bundled_models()["motor"].onnx)


def test_stream_scores_equal_batch_scores_and_are_metered(demo_scorer: OnnxScorer) -> None:
    readings = [*mixed_readings(600), Reading("acme", "unknown", "temp", DAY_US, 1.0)]
    types = {("acme", "m1"): "motor", ("acme", "m2"): "motor", ("globex", "m1"): "motor"}
    meter = InferenceMeter()
    scorer = StreamScorer({"motor": demo_scorer}, lambda t, d: types.get((t, d)), meter)
    # Fed in uneven chunks: the state carries over from one call to the next.
    stream: list[float | None] = []
    for lo, hi in [(0, 1), (1, 50), (50, 333), (333, len(readings))]:
        stream += scorer.score(readings[lo:hi])
    assert stream[-1] is None  # a device without a model type is not scored
    scored = readings[:-1]
    ordered, f = table_features(readings_to_table(scored))
    batch = dict(
        zip(
            zip(
                ordered["tenant_id"].to_pylist(),
                ordered["device_id"].to_pylist(),
                ordered["metric"].to_pylist(),
                ordered["ts"].cast("int64").to_pylist(),
                strict=True,
            ),
            demo_scorer.score(f).tolist(),
            strict=True,
        )
    )
    expected = np.array([batch[r.key] for r in scored])
    np.testing.assert_allclose(np.array(stream[:-1], dtype=np.float64), expected, rtol=0, atol=1e-6)
    counts = meter.unflushed()
    assert sum(counts.values()) == len(scored)
    assert {t for t, _ in counts} == {"acme", "globex"}
    assert counts[next(k for k in counts if k[0] == "globex")] == sum(r.tenant_id == "globex" for r in scored)
