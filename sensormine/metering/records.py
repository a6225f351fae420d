"""The metered resources and the design's `UsageRecord` (tenant, timestamp, resource, quantity, unit, metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sensormine.metering.ledger import API_CALLS, ML_INFERENCE
from sensormine.metering.usage_events import DATA_EGRESS, DATA_INGESTED

# Resource -> unit, as the daily rollup counts them (docs/billing.md, "Usage rollups").
ACTIVE_DEVICES = "active_devices"
READINGS = "readings"
STORAGE = "storage"
STORAGE_MONTH = "storage_gb_month"  # the month's mean of the daily storage snapshots, in GB (10^9 bytes)
UNITS = {
    API_CALLS: "calls",
    ML_INFERENCE: "calls",
    ACTIVE_DEVICES: "devices",
    READINGS: "readings",
    STORAGE: "bytes",
    STORAGE_MONTH: "GB-month",
    DATA_INGESTED: "bytes",
    DATA_EGRESS: "bytes",
}
# Summed over a month; active devices are counted distinct over the month, storage averaged.
ADDITIVE = (API_CALLS, ML_INFERENCE, READINGS, DATA_INGESTED, DATA_EGRESS)


@dataclass(frozen=True)
class UsageRecord:
    """How much of one resource a tenant used in the period starting at `timestamp` (a UTC day)."""

    tenant_id: str
    timestamp: datetime
    resource_type: str
    quantity: Decimal
    unit: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quantity < 0:
            raise ValueError(f"usage of {self.resource_type} for {self.tenant_id} is negative: {self.quantity}")
