"""Telling people: alarms to each rule's recipients and its escalation policy's channels, every outcome
in the delivery log.

The processor hands over its changes after their commit; a worker thread sends them, so a slow or
unreachable server never holds up the write path. Each e-mail carries the tenant's branding (its
own, else the nearest ancestor's); each text goes through the channel owner's SMS gateway (its own,
else the nearest ancestor's, else the deployment's `SENSORMINE_SMS_URL`). Outcomes (delivered /
failed / dead, attempts, error) land in `alarm_deliveries`, which
`GET /api/alerts/alarms/{id}/deliveries` shows.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg

from sensormine.alerts.channels import Channel, Policy, SmsProviderConfig, list_policies, sms_gateway_of
from sensormine.alerts.notify import (
    Branding,
    Delivery,
    EmailChannel,
    HttpSmsProvider,
    Notification,
    SmsChannel,
    SmsProvider,
    WebhookChannel,
)
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
        level=max(1, change.level),
        device_id=alarm.device_id,
        metric=alarm.metric or "",
        value=alarm.last_value,
        condition=alarm.condition_text,
        ts=at,
        branding=brand,
    )


def targets_of(
    change: AlarmChange, channels: Mapping[tuple[str, str], Channel], policies: Mapping[tuple[str, str], Policy]
) -> list[tuple[str, list[str], str | None, str]]:
    """(kind, targets, webhook secret, whose channel) to send one change to.

    Raised and cleared alarms go to the rule's direct e-mail recipients; with a policy, a raise goes to
    level 1 when it is due at once, an escalation or reminder to its level, and a clear to every
    level notified so far. Disabled or deleted channels are skipped.
    """
    alarm = change.alarm
    out: list[tuple[str, list[str], str | None, str]] = []
    if change.kind in ("raised", "cleared") and change.rule is not None and change.rule.notify.emails:
        out.append(("email", list(change.rule.notify.emails), None, change.rule.tenant_id))
    policy = policies.get((alarm.policy_tenant_id or "", alarm.policy_id or ""))
    if policy is None:
        return out
    if change.kind == "cleared":
        levels = range(1, alarm.escalation_level + 1)
    elif change.kind == "raised":
        levels = range(1, 2) if alarm.escalation_level >= 1 else range(0)
    else:
        levels = range(change.level, change.level + 1)
    names = [name for lv in levels for name in policy.spec.levels[lv - 1].channels]
    for name in dict.fromkeys(names):
        channel = channels.get((policy.tenant_id, name))
        if channel is not None and channel.enabled:
            out.append((channel.kind, list(channel.targets), channel.secret, channel.tenant_id))
    return out


class Dispatcher:
    """Sends alarm changes in a worker thread; `close` waits for what is queued."""

    def __init__(
        self,
        connect: Callable[[], psycopg.Connection],
        email: EmailChannel | None,
        sms: SmsProvider | None = None,
        webhook_sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._connect = connect
        self.email = email
        self.sms = sms
        self.webhook_sleep = webhook_sleep
        self._queue: queue.Queue[list[AlarmChange] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="alarm-notifications", daemon=True)
        self._worker.start()

    def __call__(self, changes: Sequence[AlarmChange]) -> None:
        """Queue changes (the processor's `notify`)."""
        if changes:
            self._queue.put(list(changes))

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

    def _deliver(
        self, kind: str, targets: list[str], secret: str | None, n: Notification, gateway: SmsProviderConfig | None
    ) -> list[Delivery]:
        if kind == "email":
            if self.email is None:
                return [Delivery("email", ", ".join(targets), "failed", 0, "no SMTP server (SENSORMINE_SMTP_URL)")]
            return [self.email.send(n, targets)]
        if kind == "webhook":
            assert secret is not None
            return [WebhookChannel(targets[0], secret, sleep=self.webhook_sleep).send(n)]
        # The channel owner's gateway (or the nearest ancestor's), else the deployment's.
        sms = HttpSmsProvider(gateway.url, gateway.token or "", sleep=self.webhook_sleep) if gateway else self.sms
        if sms is None:
            return [Delivery("sms", t, "failed", 0, "no SMS provider (SENSORMINE_SMS_URL)") for t in targets]
        return [SmsChannel(sms).send(n, t) for t in targets]

    def _send(self, conn: psycopg.Connection, changes: list[AlarmChange]) -> None:
        with conn.transaction():
            rows = conn.execute("SELECT id, name, parent_id, branding FROM tenants").fetchall()
            channels = {
                (r[0], r[1]): Channel(r[0], r[1], r[2], list(r[3]), r[4], None, r[5])
                for r in conn.execute(
                    "SELECT tenant_id, id, kind, targets, enabled, secret FROM alert_channels"
                ).fetchall()
            }
            policies = {(p.tenant_id, p.id): p for p in list_policies(conn)}
            gateways = {
                r[0]: SmsProviderConfig(r[0], r[1], None, r[2])
                for r in conn.execute("SELECT tenant_id, url, token FROM alert_sms_providers").fetchall()
            }
        tenants = {r[0]: (r[1], r[2], r[3] or {}) for r in rows}
        parents = {r[0]: r[2] for r in rows}
        for change in changes:
            n = notification(change, tenants)
            for kind, targets, secret, owner in targets_of(change, channels, policies):
                gateway = sms_gateway_of(owner, gateways, parents) if kind == "sms" else None
                for d in self._deliver(kind, targets, secret, n, gateway):
                    with conn.transaction():
                        record_delivery(
                            conn, change.alarm, change.kind, change.level, d.channel, d.target, d.status, d.attempts,
                            d.last_error,
                        )  # fmt: skip

    def drain(self) -> None:
        """Wait until everything queued so far is sent."""
        self._queue.join()

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._worker.join(timeout=60)
