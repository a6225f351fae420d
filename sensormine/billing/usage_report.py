"""Daily usage reported to Stripe as billing meter events, each sent once (docs/billing.md).

A closed UTC day's `usage_daily` counts of the metered resources (`stripe_sync.METERS`) become one
meter event per tenant, resource and day, with the identifier `sensormine:<tenant>:<resource>:<day>`
(Stripe refuses a second event with an identifier it has seen) and a timestamp inside that day.
Each event Stripe acknowledges is recorded in `stripe_meter_events` in its own transaction, so a
re-run or backfill of any range sends only what is missing. Stripe takes events up to 35 days old:
older days are skipped and say so; today is skipped until it is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import psycopg
import stripe

from sensormine.billing.stripe_sync import METERS

MAX_AGE = timedelta(days=35)  # Stripe refuses meter events with older timestamps


@dataclass
class UsageReport:
    """What one tenant-day's report did: identifiers sent now, already sent, and why nothing was sent."""

    sent: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: str | None = None


def identifier(tenant_id: str, resource: str, day: date) -> str:
    """The meter event's identifier: the same tenant, resource and day always give the same one."""
    return f"sensormine:{tenant_id}:{resource}:{day.isoformat()}"


def report_usage_day(
    conn: psycopg.Connection, client: stripe.StripeClient, tenant_id: str, day: date, now: datetime | None = None
) -> UsageReport:
    """Send the tenant-day's metered usage to Stripe unless sent already (`conn` as the metering role, idle)."""
    now = now or datetime.now(UTC)
    report = UsageReport()
    day_start = datetime.combine(day, time(), UTC)
    if day >= now.date():
        report.skipped = f"{day} is not over yet: its usage is reported once the day has closed"
        return report
    # The event's timestamp is the day's last second: inside the day, and as recent as it can be.
    stamp = day_start + timedelta(days=1, seconds=-1)
    if stamp < now - MAX_AGE:
        report.skipped = f"{day} is older than Stripe accepts meter events for (35 days)"
        return report
    with conn.transaction():
        tenant = conn.execute("SELECT stripe_customer_id FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
        usage: dict[str, Decimal] = dict(
            conn.execute(
                "SELECT resource, quantity FROM usage_daily WHERE tenant_id = %s AND day = %s AND resource = ANY(%s)",
                (tenant_id, day, list(METERS)),
            ).fetchall()
        )
        done = {
            r[0]
            for r in conn.execute(
                "SELECT identifier FROM stripe_meter_events WHERE tenant_id = %s AND day = %s", (tenant_id, day)
            ).fetchall()
        }
    if tenant is None or tenant[0] is None:
        report.skipped = f"tenant {tenant_id!r} has no Stripe customer (`sensormine billing sync-customers`)"
        return report
    for resource, (event_name, _) in METERS.items():
        value = int(usage.get(resource) or 0)
        ident = identifier(tenant_id, resource, day)
        if ident in done:
            report.kept.append(ident)
            continue
        if value == 0:
            continue  # nothing to bill: no event
        client.v1.billing.meter_events.create(
            {
                "event_name": event_name,
                "identifier": ident,
                "timestamp": int(stamp.timestamp()),
                "payload": {"stripe_customer_id": tenant[0], "value": str(value)},
            }
        )
        with conn.transaction():
            conn.execute(
                "INSERT INTO stripe_meter_events (identifier, tenant_id, day, resource, event_name, value) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (identifier) DO NOTHING",
                (ident, tenant_id, day, resource, event_name, value),
            )
        report.sent.append(ident)
    return report
