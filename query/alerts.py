"""Dry runs of alarm rules over stored data (both tiers): "this rule would have fired 3 times"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
import psycopg

from query.points import query_points
from sensormine.alerts.engine import Transition, replay
from sensormine.alerts.rules import Rule, metrics_of
from sensormine.clients.postgres import tenant_scope
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
) -> DryRun:
    """Replay the tenant's readings of the devices in the rule's scope through the evaluator.

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
    return DryRun(len(devices), len(readings), replay(rule, readings))
