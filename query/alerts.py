"""Dry runs of alarm rules over stored data (both tiers): "this rule would have fired 3 times"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
import psycopg

from query.points import query_points
from sensormine.alerts.engine import Transition, replay
from sensormine.alerts.rules import Rule, metrics_of, scored_metrics
from sensormine.clients.postgres import ALERTS, connect, tenant_scope
from sensormine.devices.registry import list_devices
from sensormine.reading import Reading
from sensormine.settings import Settings

MAX_DEVICES = 1000


@dataclass
class DryRun:
    """What a rule would have done over [start, end) of one tenant's stored readings."""

    devices: int = 0
    readings: int = 0
    transitions: list[Transition] = field(default_factory=list)

    @property
    def raised(self) -> int:
        """How many times it would have fired."""
        return sum(t.kind == "raise" for t in self.transitions)


def dry_run(
    conn: psycopg.Connection,
    settings: Settings,
    visible: Sequence[str],
    tenant_id: str,
    rule: Rule,
    start: datetime,
    end: datetime,
    score: bool = True,
) -> DryRun:
    """Replay the tenant's readings of the devices in the rule's scope through the evaluator.

    A rule that reads anomaly scores has the readings scored as on the stream (`anomaly_scores`;
    `score=False`: such conditions never hold).
    Nothing is written; raises ValueError when the scope covers more than MAX_DEVICES devices.
    """
    with tenant_scope(conn, visible):
        devices = [d for d in list_devices(conn, [tenant_id]) if rule.scope.matches(d.id, d.device_type, d.metadata)]
    if len(devices) > MAX_DEVICES:
        raise ValueError(f"the rule's scope covers {len(devices)} devices; a dry run takes at most {MAX_DEVICES}")
    if not devices:
        return DryRun()
    metrics = sorted(metrics_of(rule.condition)) or None
    points = query_points(conn, settings, visible, tenant_id, [d.id for d in devices], metrics, start, end).points
    frame = pl.from_arrow(points)
    assert isinstance(frame, pl.DataFrame)
    frame = frame.with_columns(pl.col("ts").dt.epoch("us").alias("us")).sort(["device_id", "us", "metric"])
    readings = [
        Reading(tenant_id, d, m, us, v)
        for d, m, us, v in frame.select("device_id", "metric", "us", "value").iter_rows()
    ]
    scored = scored_metrics(rule.condition)
    scores = None
    if score and scored:
        scores = anomaly_scores(settings, {d.id: d.device_type for d in devices}, readings, scored)
    return DryRun(len(devices), len(readings), replay(rule, readings, scores))


def anomaly_scores(
    settings: Settings, types: Mapping[str, str | None], readings: Sequence[Reading], metrics: set[str]
) -> list[float | None]:
    """Scores of the readings of `metrics` (None for the others, and where a device's type has no
    model), by the models the stream processor uses, in time order per series as on the stream.

    The models are platform data (trained across tenants): they are loaded as the evaluator's role
    and never leave the process; every scored reading is metered as an ML inference of its tenant.
    """
    # onnxruntime takes over a second to import: only dry runs of anomaly rules pay it.
    from sensormine.anomaly.metering import InferenceMeter
    from sensormine.anomaly.model import OnnxScorer
    from sensormine.anomaly.registry import models_for
    from sensormine.anomaly.stream import StreamScorer

    meter = InferenceMeter()
    with connect(settings, role=ALERTS) as conn:
        with conn.transaction():
            records = models_for(conn, sorted({t for t in types.values() if t}))
        models = {t: OnnxScorer(rec.onnx) for t, rec in records.items()}
        scorer = StreamScorer(models, lambda _tenant, device: types.get(device), meter)
        got = iter(scorer.score([r for r in readings if r.metric in metrics]))
        meter.flush(conn)
    return [next(got) if r.metric in metrics else None for r in readings]
