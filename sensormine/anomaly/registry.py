"""The model registry (`anomaly_models`, migration 019) and the bundled demo models.

Versions are platform-wide (no tenant column): one model per device type, trained across the
tenants that have devices of that type. Scoring takes a type's newest registered version, or the
model bundled under `sensormine/anomaly/models/` when none is registered yet, so a fresh
platform scores its simulated motors from the first minute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sensormine.anomaly.model import TrainedModel

BUNDLED_PACKAGE = "sensormine.anomaly.models"


@dataclass(frozen=True)
class ModelRecord:
    """One registered version (or a bundled model: `version` None), with its ONNX bytes."""

    version: int | None
    device_type: str
    features: tuple[str, ...]
    window_start: datetime | None
    window_end: datetime | None
    training_rows: int
    metrics: dict[str, Any]
    onnx: bytes
    created_at: datetime | None

    @property
    def ref(self) -> str:
        """How score rows name their model: `anomaly_models/<version>` or `bundled/<device type>`."""
        return f"anomaly_models/{self.version}" if self.version is not None else f"bundled/{self.device_type}"


_COLUMNS = "version, device_type, features, window_start, window_end, training_rows, metrics, onnx, created_at"


def _record(row: tuple[Any, ...]) -> ModelRecord:
    version, device_type, features, start, end, rows, metrics, onnx, created = row
    return ModelRecord(version, device_type, tuple(features), start, end, rows, metrics or {}, bytes(onnx), created)


def register_model(conn: psycopg.Connection, model: TrainedModel) -> int:
    """Record a trained model as the newest version of its device type (caller's transaction); its version."""
    row = conn.execute(
        "INSERT INTO anomaly_models (device_type, features, window_start, window_end, training_rows, metrics, "
        "onnx, onnx_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING version",
        (
            model.device_type,
            list(model.features),
            model.window_start,
            model.window_end,
            model.training_rows,
            Jsonb(model.metrics),
            model.onnx,
            model.sha256,
        ),
    ).fetchone()
    assert row is not None
    return int(row[0])


def latest_models(conn: psycopg.Connection, device_types: list[str] | None = None) -> dict[str, ModelRecord]:
    """The newest registered version of each device type (of those given, or of all)."""
    rows = conn.execute(
        f"SELECT DISTINCT ON (device_type) {_COLUMNS} FROM anomaly_models "
        "WHERE %s::text[] IS NULL OR device_type = ANY(%s) ORDER BY device_type, version DESC",
        (device_types, device_types),
    ).fetchall()
    return {r[1]: _record(r) for r in rows}


def bundled_models() -> dict[str, ModelRecord]:
    """The models shipped in the package (`models/<device type>.onnx` with its `.json` card)."""
    found: dict[str, ModelRecord] = {}
    root = resources.files(BUNDLED_PACKAGE)
    for entry in root.iterdir():
        if not entry.name.endswith(".onnx"):
            continue
        device_type = entry.name.removesuffix(".onnx")
        card = json.loads(root.joinpath(f"{device_type}.json").read_text())
        found[device_type] = ModelRecord(
            version=None,
            device_type=device_type,
            features=tuple(card["features"]),
            window_start=None,
            window_end=None,
            training_rows=int(card["training_rows"]),
            metrics=card.get("metrics", {}),
            onnx=entry.read_bytes(),
            created_at=None,
        )
    return found


def models_for(conn: psycopg.Connection, device_types: list[str]) -> dict[str, ModelRecord]:
    """The model scoring uses for each device type: newest registered, else bundled; types with neither are left out."""
    registered = latest_models(conn, device_types)
    bundled = bundled_models()
    return {t: registered.get(t) or bundled[t] for t in device_types if t in registered or t in bundled}
