"""The anomaly model: an IsolationForest per device type, trained on features, shipped and scored as ONNX.

Training uses scikit-learn; `to_onnx_model` converts with skl2onnx and appends two nodes so that the
graph's one output, `anomaly_score`, is the score itself: `-score_samples(x)` of the forest, that is
2^(-E[path length] / c(n)) of Liu et al., in (0, 1]. Higher is more anomalous: about 0.4-0.5 for
ordinary points, above `ANOMALY_THRESHOLD` (0.6) for points the forest isolates unusually fast.
`OnnxScorer` loads such a graph once and scores float32 feature matrices with onnxruntime; nothing
else (no scikit-learn) is needed to score.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from sensormine.anomaly.features import FEATURES

INPUT_NAME = "features"
OUTPUT_NAME = "anomaly_score"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}  # what skl2onnx 1.20 and onnxruntime 1.32 agree on
ANOMALY_THRESHOLD = 0.6
"""Scores above this are worth a look: the forest's own default cut (offset -0.5) would be 0.5."""

# Small enough to commit (about 0.5 MB as ONNX) and to score a reading in well under a millisecond.
N_ESTIMATORS = 64
MAX_SAMPLES = 256
MAX_TRAINING_ROWS = 200_000


@dataclass(frozen=True)
class TrainedModel:
    """A converted model and what the registry records about it."""

    device_type: str
    features: tuple[str, ...]
    onnx: bytes
    window_start: datetime
    window_end: datetime
    training_rows: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """Digest of the ONNX bytes."""
        return hashlib.sha256(self.onnx).hexdigest()


def _prune(graph: onnx.GraphProto, output: str) -> None:
    """Drop the nodes that do not feed `output` (the converter's label branch), in place."""
    needed = {output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    used = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def to_onnx_model(forest: Any, n_features: int, metadata: dict[str, str] | None = None) -> bytes:
    """A fitted IsolationForest as an ONNX graph with the single output `anomaly_score` (n x 1, float32)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model = to_onnx(
        forest, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))], target_opset=TARGET_OPSET
    )
    graph = model.graph
    # The converter's `scores` is decision_function = score_samples - offset_.
    graph.initializer.append(numpy_helper.from_array(np.array([forest.offset_], dtype=np.float32), "score_offset"))
    graph.node.extend(
        [
            helper.make_node("Add", ["scores", "score_offset"], ["score_samples"]),
            helper.make_node("Neg", ["score_samples"], [OUTPUT_NAME]),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, [None, 1]))
    _prune(graph, OUTPUT_NAME)
    # The converter lists opsets in set order (string hashing differs per process): sort for stable bytes.
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets)
    for key, value in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def train(
    device_type: str,
    features: np.ndarray,
    window_start: datetime,
    window_end: datetime,
    seed: int = 0,
    feature_names: Sequence[str] = FEATURES,
) -> TrainedModel:
    """Fit an IsolationForest on feature rows of one device type and convert it; metrics from its own scores."""
    from sklearn.ensemble import IsolationForest

    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(feature_names) or x.shape[0] < 2:
        raise ValueError(f"need at least two rows of {len(feature_names)} features, got shape {x.shape}")
    if x.shape[0] > MAX_TRAINING_ROWS:  # an even sample: the forest only looks at MAX_SAMPLES per tree anyway
        x = x[np.random.default_rng(seed).choice(x.shape[0], MAX_TRAINING_ROWS, replace=False)]
    forest = IsolationForest(n_estimators=N_ESTIMATORS, max_samples=min(MAX_SAMPLES, x.shape[0]), random_state=seed)
    forest.fit(x)
    meta = {
        "device_type": device_type,
        "features": json.dumps(list(feature_names)),
        "window": f"{window_start.isoformat()}/{window_end.isoformat()}",
    }
    data = to_onnx_model(forest, x.shape[1], meta)
    scores = OnnxScorer(data).score(x)
    metrics = {
        "n_estimators": N_ESTIMATORS,
        "max_samples": int(forest.max_samples_),
        "seed": seed,
        "score_p50": round(float(np.quantile(scores, 0.5)), 6),
        "score_p99": round(float(np.quantile(scores, 0.99)), 6),
        "score_max": round(float(scores.max()), 6),
        "above_threshold": round(float(np.mean(scores > ANOMALY_THRESHOLD)), 6),
        # How far ONNX is from scikit-learn on the training rows (the conversion's error).
        "max_abs_diff_sklearn": float(np.max(np.abs(scores + forest.score_samples(x)))),
    }
    return TrainedModel(
        device_type, tuple(feature_names), data, window_start, window_end, int(features.shape[0]), metrics
    )


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime session options of the platform's scorers (`threads` None: onnxruntime's default)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class OnnxScorer:
    """An anomaly model loaded once: `score(features)` -> one float32 score per row, in (0, 1], higher = odder."""

    def __init__(self, model: bytes | str | Path, threads: int | None = None) -> None:
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
        [inp] = self.session.get_inputs()
        self.input_name = inp.name
        self.n_features = int(inp.shape[1])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.features: tuple[str, ...] = tuple(json.loads(meta["features"])) if "features" in meta else FEATURES
        self.device_type: str | None = meta.get("device_type")
        self._outputs = [OUTPUT_NAME]

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores (n,) of a 2-D (n x n_features) array; float64 or non-contiguous input is converted once."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"expected an (n, {self.n_features}) array, got shape {features.shape}")
        if features.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        x = (
            features
            if features.dtype == np.float32 and features.flags.c_contiguous
            else np.ascontiguousarray(features, dtype=np.float32)
        )
        out = self.session.run(self._outputs, {self.input_name: x})[0]
        return out.reshape(-1)
