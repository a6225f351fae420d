"""Telling people: raised and cleared alarms to each rule's recipients, every outcome in the delivery log.

The processor hands over its changes after their commit; a worker thread sends them, so a slow or
unreachable mail server never holds up the write path. Each e-mail carries the tenant's branding
(its own, else the nearest ancestor's). Outcomes (delivered / failed / dead, attempts, error) land
in `alarm_deliveries`, which `GET /api/alerts/alarms/{id}/deliveries` shows.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from sensormine.alerts.notify import Branding, EmailChannel, Notification
from sensormine.alerts.store import AlarmChange, record_delivery

log = logging.getLogger(__name__)


def notification(change: AlarmChange, tenants: dict[str, tuple[str, str | None, dict[str, Any]]]) -> Notification:
    """The message for one change; `tenants` maps id -> (name, parent, branding overrides)."""
    alarm = change.alarm
    merged: dict[str, Any] = {}
    t: str | None = alarm.tenant_id
    while t is not None and t in tenants:
        _name, parent, branding = tenants[t]
        merged = {**{k: v for k, v in branding.items() if v is not None}, **merged}
        t = parent
    tenant_name = tenants.get(alarm.tenant_id, (alarm.tenant_id, None, {}))[0]
    brand = Branding(
        name=merged.get("display_name") or tenant_name,
        **{k: v for k, v in (("color", merged.get("primary_color")), ("logo_url", merged.get("logo_url"))) if v},
    )
    at = alarm.cleared_at if change.kind == "cleared" and alarm.cleared_at else alarm.raised_at
    return Notification(
        tenant_id=alarm.tenant_id,
        tenant_name=tenant_name,
        alarm_id=alarm.id,
        rule_name=alarm.rule_name,
        severity=alarm.severity,  # type: ignore[arg-type]
        state=change.kind,
        device_id=alarm.device_id,
        metric=alarm.metric or "",
        value=alarm.last_value,
        condition=alarm.condition_text,
        ts=at,
        branding=brand,
    )


class Dispatcher:
    """Sends alarm changes in a worker thread; `close` waits for what is queued."""

    def __init__(self, connect: Callable[[], psycopg.Connection], email: EmailChannel | None) -> None:
        self._connect = connect
        self.email = email
        self._queue: queue.Queue[list[AlarmChange] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="alarm-notifications", daemon=True)
        self._worker.start()

    def __call__(self, changes: Sequence[AlarmChange]) -> None:
        """Queue changes (the processor's `notify`)."""
        wanted = [c for c in changes if c.rule.notify.emails]
        if wanted:
            self._queue.put(wanted)

    def _loop(self) -> None:
        conn: psycopg.Connection | None = None
        while (changes := self._queue.get()) is not None:
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                self._send(conn, changes)
            except Exception:
                log.exception("sending %d alarm notification(s) failed", len(changes))
                if conn is not None:
                    conn.close()
                    conn = None
            finally:
                self._queue.task_done()
        self._queue.task_done()
        if conn is not None:
            conn.close()

    def _send(self, conn: psycopg.Connection, changes: list[AlarmChange]) -> None:
        with conn.transaction():
            rows = conn.execute("SELECT id, name, parent_id, branding FROM tenants").fetchall()
        tenants = {r[0]: (r[1], r[2], r[3] or {}) for r in rows}
        for change in changes:
            recipients = list(change.rule.notify.emails)
            target = ", ".join(recipients)
            error: str | None
            if self.email is None:
                status, attempts, error = "failed", 0, "no SMTP server configured (SENSORMINE_SMTP_URL)"
            else:
                d = self.email.send(notification(change, tenants), recipients)
                status, attempts, error = d.status, d.attempts, d.last_error
            with conn.transaction():
                record_delivery(conn, change.alarm, change.kind, "email", target, status, attempts, error)

    def drain(self) -> None:
        """Wait until everything queued so far is sent."""
        self._queue.join()

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._worker.join(timeout=60)
