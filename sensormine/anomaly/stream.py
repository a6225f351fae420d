"""Streaming anomaly scores: incremental features per (tenant, device, metric) and the same ONNX models.

`StreamScorer.score(readings)` returns one score per reading (None when its device's type has no
model) from the per-series state of `features.SeriesState` and the device type's `OnnxScorer`:
for the same points in time order, the same model gives the scores the batch asset writes.
Readings of one call are scored in as few ONNX runs as possible: features advance series by
series in arrival order, in rounds of one reading per series, and each model runs once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sensormine.anomaly.features import FEATURES, SeriesState, stream_features
from sensormine.anomaly.metering import InferenceMeter
from sensormine.anomaly.model import OnnxScorer
from sensormine.reading import Reading

SeriesKey = tuple[str, str, str]  # (tenant_id, device_id, metric)


class StreamScorer:
    """Scores readings as they arrive, keeping the feature state of every series it has seen. Not thread-safe."""

    def __init__(
        self,
        models: Mapping[str, OnnxScorer],
        device_type: Callable[[str, str], str | None],
        meter: InferenceMeter | None = None,
    ) -> None:
        """`models` by device type; `device_type(tenant, device)` from the registry; `meter` counts scored rows."""
        self.models = dict(models)
        self.device_type = device_type
        self.meter = meter
        self.states: dict[SeriesKey, SeriesState] = {}

    def score(self, readings: Sequence[Reading]) -> list[float | None]:
        """One score per reading, in order (None: no model for the device's type)."""
        scores: list[float | None] = [None] * len(readings)
        model_of: list[str | None] = []
        rounds: list[list[int]] = []  # rounds[r]: readings that are the r-th of their series in this call
        seen: dict[SeriesKey, int] = {}
        for i, r in enumerate(readings):
            kind = self.device_type(r.tenant_id, r.device_id)
            model_of.append(kind if kind in self.models else None)
            if model_of[-1] is None:
                continue
            key = (r.tenant_id, r.device_id, r.metric)
            nth = seen.get(key, 0)
            seen[key] = nth + 1
            if nth == len(rounds):
                rounds.append([])
            rounds[nth].append(i)
        features = np.zeros((len(readings), len(FEATURES)))
        for members in rounds:
            states = [self._state(readings[i]) for i in members]
            features[members] = stream_features(
                states, [readings[i].ts for i in members], [readings[i].value for i in members]
            )
        counted: dict[str, int] = {}
        for kind in {m for m in model_of if m is not None}:
            rows = [i for i, m in enumerate(model_of) if m == kind]
            for i, s in zip(rows, self.models[kind].score(features[rows]).tolist(), strict=True):
                scores[i] = s
                counted[readings[i].tenant_id] = counted.get(readings[i].tenant_id, 0) + 1
        if self.meter is not None:
            for tenant_id, n in counted.items():
                self.meter.count(tenant_id, n)
        return scores

    def _state(self, reading: Reading) -> SeriesState:
        key = (reading.tenant_id, reading.device_id, reading.metric)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = SeriesState()
        return state
