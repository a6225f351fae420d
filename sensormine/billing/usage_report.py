"""Daily usage reported to Stripe as billing meter events, each sent once (docs/billing.md).

A closed UTC day's `usage_daily` counts of the metered resources (`stripe_sync.METERS`) become one
meter event per tenant, resource and day, with the identifier `sensormine:<tenant>:<resource>:<day>`
(Stripe refuses a second event with an identifier it has seen) and a timestamp inside that day.
Each event Stripe acknowledges is recorded in `stripe_meter_events` in its own transaction, so a
re-run or backfill of any range sends only what is missing. Stripe takes events up to 35 days old:
older days are skipped and say so; today is skipped until it is over.

Corrections: when a day's count changes after it was reported (a late ledger flush), a count that
grew is topped up by an event of the difference (identifier `...:r<n>`); one that shrank has its
events cancelled by MeterEventAdjustments and the new count sent, while Stripe still allows that
(24 hours after an event); later, Stripe cannot take usage back, and the report says so
(`overreported`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import psycopg
import stripe

from sensormine.billing.stripe_sync import METERS

MAX_AGE = timedelta(days=35)  # Stripe refuses meter events with older timestamps
CANCEL_WITHIN = timedelta(hours=23)  # Stripe cancels a meter event up to 24 h after it received it


@dataclass
class UsageReport:
    """What one tenant-day's report did: identifiers sent now, already sent, and why nothing was sent."""

    sent: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    overreported: list[str] = field(default_factory=list)
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
        ledger = conn.execute(
            "SELECT resource, identifier, value, sent_at, canceled_at FROM stripe_meter_events "
            "WHERE tenant_id = %s AND day = %s ORDER BY sent_at, identifier",
            (tenant_id, day),
        ).fetchall()
    if tenant is None or tenant[0] is None:
        report.skipped = f"tenant {tenant_id!r} has no Stripe customer (`sensormine billing sync-customers`)"
        return report
    customer = tenant[0]
    for resource, (event_name, _) in METERS.items():
        value = int(usage.get(resource) or 0)
        rows = [r for r in ledger if r[0] == resource]
        active = [r for r in rows if r[4] is None]
        reported = sum(r[2] for r in active)
        base = identifier(tenant_id, resource, day)
        ident = base if not rows else f"{base}:r{len(rows)}"
        if value == reported:
            report.kept.extend(r[1] for r in active)
            continue
        if value > reported:  # first report, or a count that grew: send the difference
            _send(conn, client, report, tenant_id, day, resource, event_name, customer, ident, value - reported, stamp)
            continue
        if any(now - r[3] > CANCEL_WITHIN for r in active):
            report.overreported.append(
                f"{resource}: {reported} reported, {value} now; Stripe takes no usage back after 24 hours"
            )
            continue
        for r in active:  # a count that shrank while Stripe may still cancel: cancel, then send the new count
            client.v1.billing.meter_event_adjustments.create(
                {"event_name": event_name, "type": "cancel", "cancel": {"identifier": r[1]}}
            )
            with conn.transaction():
                conn.execute("UPDATE stripe_meter_events SET canceled_at = now() WHERE identifier = %s", (r[1],))
            report.canceled.append(r[1])
        if value:
            _send(conn, client, report, tenant_id, day, resource, event_name, customer, ident, value, stamp)
    return report


def _send(
    conn: psycopg.Connection, client: stripe.StripeClient, report: UsageReport, tenant_id: str, day: date,
    resource: str, event_name: str, customer: str, ident: str, value: int, stamp: datetime,
) -> None:  # fmt: skip
    """One meter event, recorded once Stripe acknowledged it."""
    client.v1.billing.meter_events.create(
        {
            "event_name": event_name,
            "identifier": ident,
            "timestamp": int(stamp.timestamp()),
            "payload": {"stripe_customer_id": customer, "value": str(value)},
        }
    )
    with conn.transaction():
        conn.execute(
            "INSERT INTO stripe_meter_events (identifier, tenant_id, day, resource, event_name, value) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (identifier) DO NOTHING",
            (ident, tenant_id, day, resource, event_name, value),
        )
    report.sent.append(ident)
