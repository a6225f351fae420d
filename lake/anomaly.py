"""The lake's anomaly scores: features and ONNX scores of one tenant-day, and training rows from history.

Layout: `{lake_root}/anomaly_scores`, partitioned like telemetry (tenant_id, date). One row per
reading of the partition, with its features, its score (null when its device's type has no model)
and the model that scored it. A tenant-day is only ever written whole by `write_scores`, which
replaces the partition, so re-running it gives the same rows and never duplicates.
Features start afresh each day: a series' first `WINDOW` readings of a day see a shorter window
than the streaming scorer, which carries its state across midnight (docs/anomaly.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lake.storage import ensure_table, read_partition, replace_partition
from lake.telemetry import read_telemetry
from sensormine.anomaly.features import FEATURES, table_features
from sensormine.anomaly.model import OnnxScorer
from sensormine.anomaly.registry import ModelRecord
from sensormine.settings import Settings

TABLE_NAME = "anomaly_scores"
KEY_COLUMNS = ["tenant_id", "device_id", "metric", "ts"]
SCORES_SCHEMA = pa.schema(
    [
        pa.field("tenant_id", pa.string(), nullable=False),
        pa.field("device_id", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        *(pa.field(name, pa.float64(), nullable=False) for name in FEATURES),
        pa.field("score", pa.float32(), nullable=True),
        pa.field("model", pa.string(), nullable=True),
        pa.field("date", pa.date32(), nullable=False),
    ]
)


def score_readings(
    readings: pa.Table, device_types: Mapping[str, str | None], models: Mapping[str, ModelRecord]
) -> pa.Table:
    """Score rows (SCORES_SCHEMA, sorted by key) of one tenant's readings; `device_types` by device id."""
    ordered, features = table_features(readings)
    n = ordered.num_rows
    scores = np.full(n, np.nan, dtype=np.float32)
    refs: list[str | None] = [None] * n
    kinds = np.array([device_types.get(d) or "" for d in ordered["device_id"].to_pylist()], dtype=object)
    for kind, record in models.items():
        rows = np.flatnonzero(kinds == kind)
        if rows.size == 0:
            continue
        scores[rows] = OnnxScorer(record.onnx).score(features[rows])
        for i in rows.tolist():
            refs[i] = record.ref
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        c: ordered[c] for c in ("tenant_id", "device_id", "metric", "ts", "value")
    }
    for j, name in enumerate(FEATURES):
        columns[name] = pa.array(features[:, j], pa.float64())
    columns["score"] = pa.array(scores, pa.float32(), mask=np.isnan(scores))
    columns["model"] = pa.array(refs, pa.string())
    columns["date"] = pc.cast(ordered["ts"], pa.date32())
    return pa.table(columns).cast(SCORES_SCHEMA).combine_chunks()


@dataclass(frozen=True)
class ScoreResult:
    """What one `write_scores` committed."""

    rows: int
    scored: int
    table_version: int
    by_model: dict[str, int]


def write_scores(
    settings: Settings,
    tenant_id: str,
    day: date,
    device_types: Mapping[str, str | None],
    models: Mapping[str, ModelRecord],
) -> ScoreResult:
    """Score the lake's telemetry of one tenant-day and replace that partition of anomaly_scores."""
    rows = score_readings(read_telemetry(settings, [tenant_id], days=[day]), device_types, models)
    table = ensure_table(
        settings,
        TABLE_NAME,
        SCORES_SCHEMA,
        "Anomaly features and ONNX scores per reading; one partition per tenant and UTC day.",
    )
    version = replace_partition(table, rows, tenant_id, day, "anomaly_scores")
    refs = [r for r in rows["model"].to_pylist() if r is not None]
    by_model = {ref: refs.count(ref) for ref in sorted(set(refs))}
    return ScoreResult(rows=rows.num_rows, scored=len(refs), table_version=version, by_model=by_model)


def read_scores(settings: Settings, tenant_id: str, day: date) -> pa.Table:
    """One tenant-day of anomaly_scores, sorted by key (empty when missing)."""
    return read_partition(settings, TABLE_NAME, SCORES_SCHEMA, tenant_id, day, KEY_COLUMNS)


def training_features(
    settings: Settings, devices: Mapping[str, set[str]], start: datetime, end: datetime
) -> tuple[np.ndarray, int]:
    """Feature rows of `devices` ({tenant: device ids}) from lake readings in [start, end), and the reading count."""
    parts: list[np.ndarray] = []
    total = 0
    for tenant_id in sorted(devices):
        readings = read_telemetry(settings, [tenant_id], device_ids=sorted(devices[tenant_id]), start=start, end=end)
        total += readings.num_rows
        if readings.num_rows:
            parts.append(table_features(readings)[1])
    return (np.concatenate(parts) if parts else np.zeros((0, len(FEATURES)))), total
