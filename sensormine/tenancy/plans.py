"""Subscription plans: quotas and data retention per plan (PRODUCT-DESIGN.md, "Subscription Plans").

Retention is ours to define (the design leaves it open): the hot store keeps a plan's recent
days for fast queries, the lake keeps history. `None` means unlimited.

So is the request rate (docs/quotas.md): every tenant's API calls pass a token bucket that refills at
`rate_per_s` tokens a second and holds at most `burst`. Enterprise has no monthly cap but keeps a
(high) rate limit: it protects the platform from a runaway client, not a commercial limit.
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
    rate_per_s: float | None = None  # sustained API requests a second; None: not rate limited
    burst: int | None = None  # the token bucket's size: requests accepted at once after a quiet spell

    def __post_init__(self) -> None:
        # The lake must outlive the hot store: a day leaves the hot store only once the lake holds it.
        if self.lake_retention_days is not None and self.lake_retention_days < self.hot_retention_days:
            raise PlanError(f"plan {self.name}: lake retention shorter than hot retention")
        if (self.rate_per_s is None) != (self.burst is None):
            raise PlanError(f"plan {self.name}: set both rate_per_s and burst, or neither")
        if self.rate_per_s is not None and self.burst is not None and (self.rate_per_s <= 0 or self.burst < 1):
            raise PlanError(f"plan {self.name}: rate_per_s must be > 0 and burst >= 1")


PLANS: dict[str, Plan] = {
    p.name: p
    for p in (
        Plan("free", 10, 1, 10_000, hot_retention_days=7, lake_retention_days=90, rate_per_s=10, burst=20),
        Plan("pro", 100, 50, 1_000_000, hot_retention_days=30, lake_retention_days=730, rate_per_s=100, burst=200),
        Plan(
            "enterprise",
            None,
            None,
            None,
            hot_retention_days=30,
            lake_retention_days=None,
            rate_per_s=10_000,
            burst=20_000,
        ),
    )
}


def get_plan(name: str) -> Plan:
    """The plan called `name`."""
    try:
        return PLANS[name]
    except KeyError:
        raise PlanError(f"unknown plan {name!r}; known plans: {', '.join(PLANS)}") from None
