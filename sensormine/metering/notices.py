"""The notice mailer: tenant events its administrators should hear of, mailed to them once.

Quota warnings and refusals (`quota.<metric>.warning|exceeded`) and billing notices (`billing.*`,
from Stripe's webhooks) are tenant events (`tenant_events`), written in the transaction that
decides them. This drain (an outbox: a thread of each API process) takes unmailed events of the
last week (`FOR UPDATE SKIP LOCKED`: several processes never take the same one), sends each to the
tenant's administrators through the deployment's SMTP server, and records the outcome (`mailed_at`,
and `emailed_to` or `email_error` in the event's data). A mail server that fails is tried again on
the next rounds, up to MAX_ATTEMPTS; a crash between the send and its record sends that one mail
again (at least once). A tenant without administrators is recorded as such and not retried.
"""

from __future__ import annotations

import logging
import smtplib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from email.message import EmailMessage
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from sensormine.clients.smtp import SmtpServer, redacted

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
BATCH = 50
MAILED_PREFIXES = ("quota.", "billing.")
ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection]]


def _fmt(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def render(tenant_id: str, event_type: str, data: dict[str, Any]) -> tuple[str, str]:
    """(subject, text) of an event's mail."""
    if "message" in data:  # billing notices carry their sentence
        message = str(data["message"])
    elif event_type.startswith("quota."):
        what = str(data.get("metric", "usage")).replace("_", " ")
        used, limit, plan = _fmt(data.get("used")), _fmt(data.get("limit")), data.get("plan")
        if data.get("metric") == "storage_bytes":  # bytes read best as GB
            what = "storage"
            used, limit = (f"{(data.get(k) or 0) / 10**9:.2f} GB" for k in ("used", "limit"))
        if event_type.endswith(".exceeded") and what == "storage":
            message = (f"The {plan} plan's limit of {limit} storage is reached ({used} stored): new readings are "
                       "refused and kept in the dead-letter queue until the plan is upgraded or the data shrinks; "
                       "replay them after.")  # fmt: skip
        elif event_type.endswith(".exceeded"):
            message = (f"The {plan} plan's limit of {limit} {what} is reached ({used} used): further {what} are "
                       "refused until the limit resets or the plan is upgraded.")  # fmt: skip
        else:
            pct = data.get("threshold_percent")
            message = f"{what.capitalize()} at {pct} % of the {plan} plan's limit: {used} of {limit}."
    else:
        message = event_type
    subject = f"[Sensormine] {tenant_id}: {message.split('. ')[0].split(': ')[0]}"
    return subject[:200], f"{message}\n\nTenant: {tenant_id}\nEvent: {event_type}\n"


class NoticeMailer:
    """Drains unmailed notices every `interval_s` on a daemon thread (`drain_once` does one round)."""

    def __init__(self, connect: ConnectionFactory, smtp_url: str, sender: str, interval_s: float = 5.0) -> None:
        self.connect = connect
        self.server = SmtpServer(smtp_url)
        self.sender = sender
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drain_once(self) -> int:
        """Mail what is waiting; the number of events settled (mailed, or found without recipients)."""
        settled = 0
        with self.connect() as conn, conn.transaction():
            events = conn.execute(
                "SELECT e.id, e.tenant_id, e.type, e.data, "
                "array(SELECT u.email FROM users u WHERE u.tenant_id = e.tenant_id AND u.role = 'tenant_admin' "
                "AND u.disabled_at IS NULL ORDER BY u.email) FROM tenant_events e "
                "WHERE e.mailed_at IS NULL AND e.mail_attempts < %s AND e.at > now() - interval '7 days' "
                "AND e.type LIKE ANY(%s) ORDER BY e.id LIMIT %s FOR UPDATE OF e SKIP LOCKED",
                (MAX_ATTEMPTS, [f"{p}%" for p in MAILED_PREFIXES], BATCH),
            ).fetchall()
            for event_id, tenant_id, event_type, data, recipients in events:
                error = self._send(tenant_id, event_type, data, recipients) if recipients else None
                if recipients and error:
                    conn.execute(
                        "UPDATE tenant_events SET mail_attempts = mail_attempts + 1, mail_error = %s WHERE id = %s",
                        (error, event_id),
                    )
                    continue
                outcome = {"emailed_to": recipients} if recipients else {"email_error": "no tenant administrator"}
                conn.execute(
                    "UPDATE tenant_events SET mailed_at = now(), mail_error = NULL, data = data || %s WHERE id = %s",
                    (Jsonb(outcome), event_id),
                )
                settled += 1
        return settled

    def _send(self, tenant_id: str, event_type: str, data: dict[str, Any], recipients: list[str]) -> str | None:
        subject, text = render(tenant_id, event_type, data)
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(recipients)
        msg["X-Sensormine-Notice"] = event_type
        msg.set_content(text)
        try:
            self.server.send(msg, self.sender, recipients)
        except (smtplib.SMTPException, OSError) as exc:
            log.warning("notice %s for %s not mailed yet: %s", event_type, tenant_id, exc)
            return f"cannot send through {redacted(self.server.url)}: {type(exc).__name__}: {exc}"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.drain_once()
            except psycopg.Error as exc:
                log.warning("notice mailer: %s (trying again in %.0f s)", exc, self.interval_s)

    def start(self) -> None:
        """Start draining on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="notice-mailer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop after the round in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
