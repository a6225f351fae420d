"""Subscription plans: quotas and data retention per plan (PRODUCT-DESIGN.md, "Subscription Plans").

Retention is ours to define (the design leaves it open): the hot store keeps a plan's recent
days for fast queries, the lake keeps history. `None` means unlimited.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlanError(ValueError):
    """An unknown plan name."""


@dataclass(frozen=True)
class Plan:
    """One subscription plan's limits."""

    name: str
    max_devices: int | None
    storage_gb: float | None
    api_calls_per_month: int | None
    hot_retention_days: int
    lake_retention_days: int | None

    def __post_init__(self) -> None:
        # The lake must outlive the hot store: a day leaves the hot store only once the lake holds it.
        if self.lake_retention_days is not None and self.lake_retention_days < self.hot_retention_days:
            raise PlanError(f"plan {self.name}: lake retention shorter than hot retention")


PLANS: dict[str, Plan] = {
    p.name: p
    for p in (
        Plan("free", 10, 1, 10_000, hot_retention_days=7, lake_retention_days=90),
        Plan("pro", 100, 50, 1_000_000, hot_retention_days=30, lake_retention_days=730),
        Plan("enterprise", None, None, None, hot_retention_days=30, lake_retention_days=None),
    )
}


def get_plan(name: str) -> Plan:
    """The plan called `name`."""
    try:
        return PLANS[name]
    except KeyError:
        raise PlanError(f"unknown plan {name!r}; known plans: {', '.join(PLANS)}") from None
