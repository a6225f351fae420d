"""Notification channels for alarms: e-mail (SMTP), signed webhooks and SMS, with their templates.

A channel never raises for a delivery failure: `send` returns a `Delivery` saying what happened
(docs/notifications.md has the webhook payload, the signature scheme and the retry policy).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import math
import re
import smtplib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx

from sensormine.clients.smtp import SmtpServer, redacted

Severity = Literal["critical", "major", "minor", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("critical", "major", "minor", "warning", "info")
Channel = Literal["email", "webhook", "sms"]
Status = Literal["delivered", "failed", "dead"]

PAYLOAD_VERSION = 1
"""Version of the webhook body's shape; bumped only for a change that breaks receivers."""
SMS_MAX_CHARS = 160  # one GSM-7 segment
DEFAULT_COLOR = "#1f4e79"
SEVERITY_COLORS: dict[str, str] = {
    "critical": "#b60205",
    "major": "#d93f0b",
    "minor": "#b08800",
    "warning": "#9a6700",
    "info": "#0969da",
}
_HEX_COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")

Sleep = Callable[[float], None]


# -- the notification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Branding:
    """A tenant's look in e-mails: display name, accent colour (#rgb or #rrggbb) and an https logo."""

    name: str
    color: str = DEFAULT_COLOR
    logo_url: str | None = None


@dataclass(frozen=True)
class Notification:
    """One alarm event to tell people about: what fired, where, with which value, and how urgent."""

    tenant_id: str
    tenant_name: str
    alarm_id: str
    rule_name: str
    severity: Severity
    state: str  # raised, updated, escalated, cleared, acknowledged, reminder
    device_id: str
    metric: str
    value: float | None
    condition: str  # the rule's threshold as text, e.g. "> 90" or "no data for 5 min"
    ts: datetime  # when the alarm changed state; aware, normalised to UTC
    device_name: str | None = None
    level: int = 1  # escalation level, 1 for the first tier
    link: str | None = None  # the alarm in the UI
    branding: Branding | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, not {self.severity!r}")
        if self.ts.tzinfo is None:
            raise ValueError("ts must be timezone-aware (UTC)")
        if self.level < 1:
            raise ValueError(f"level must be at least 1, not {self.level}")
        object.__setattr__(self, "ts", self.ts.astimezone(UTC))

    @property
    def event(self) -> str:
        """The event type receivers switch on: `alarm.<state>`."""
        return f"alarm.{self.state}"

    @property
    def event_id(self) -> str:
        """Stable for the same alarm, state, level and time, so a receiver can drop a redelivery."""
        key = "\x1f".join((self.alarm_id, self.state, str(self.level), self.ts.isoformat()))
        return "evt_" + hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def device(self) -> str:
        """The device as people know it: its name, else its id."""
        return self.device_name or self.device_id


# -- templates -------------------------------------------------------------------------------------


def _line(text: str) -> str:
    """One line: newlines and runs of whitespace become one space (no header or SMS line injection)."""
    return " ".join(text.split())


def format_value(value: float | None) -> str:
    """A reading for people: 97.2, 90, 1e-07; no float noise (0.30000000000000004 -> 0.3)."""
    return "no value" if value is None else f"{value:.15g}"


def _reading(n: Notification) -> str:
    """`temperature 97.2 > 90`, or `heartbeat no data for 5 min` when there is no value."""
    parts = [n.metric] + ([] if n.value is None else [format_value(n.value)]) + [n.condition]
    return _line(" ".join(p for p in parts if p))


def _state_label(n: Notification) -> str:
    """`Escalated (level 2)`, `Cleared`, ... for every state but `raised` (the default, left unsaid)."""
    label = n.state.replace("_", " ").capitalize()
    return f"{label} (level {n.level})" if n.state == "escalated" or n.level > 1 else label


def _headline(n: Notification) -> str:
    prefix = f"[{n.severity.upper()}]" + ("" if n.state == "raised" and n.level == 1 else f" {_state_label(n)}:")
    return _line(f"{prefix} {n.rule_name} on {n.device}: {_reading(n)}")


def _http_url(url: str | None) -> str | None:
    """The URL if it is http(s), else None: a `javascript:` link or logo never reaches an e-mail."""
    if url and urlsplit(url).scheme in ("http", "https"):
        return url
    return None


def _when(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def render_email(n: Notification) -> tuple[str, str, str]:
    """Subject, plain-text body and HTML body of the alarm e-mail (HTML escaped, tenant branding applied)."""
    subject = _headline(n)
    brand = n.branding or Branding(n.tenant_name)
    link = _http_url(n.link)
    rows: list[tuple[str, str]] = [
        ("Rule", n.rule_name),
        ("Severity", n.severity),
        ("State", n.state + (f" (level {n.level})" if n.level > 1 else "")),
        ("Device", n.device if n.device == n.device_id else f"{n.device} ({n.device_id})"),
        ("Metric", n.metric),
        ("Value", format_value(n.value)),
        ("Condition", n.condition),
        ("Time", _when(n.ts)),
        ("Alarm", n.alarm_id),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(
        [subject, ""]
        + [f"{k + ':':<{width + 1}} {_line(v)}" for k, v in rows]
        + ([f"\nOpen the alarm: {link}"] if link else [])
        + ["", f"-- {_line(brand.name)} alarms, sent by Sensormine for {_line(n.tenant_name)}", ""]
    )

    e = html.escape
    color = brand.color if _HEX_COLOR.fullmatch(brand.color or "") else DEFAULT_COLOR
    badge = SEVERITY_COLORS[n.severity]
    logo = _http_url(brand.logo_url)
    logo_html = f'<img src="{e(logo)}" alt="{e(brand.name)}" height="32" style="vertical-align:middle">' if logo else ""
    table = "".join(
        f'<tr><th align="left" style="padding:2px 12px 2px 0;color:#555">{e(k)}</th><td>{e(v)}</td></tr>'
        for k, v in rows
    )
    button = (
        f'<p><a href="{e(link)}" style="background:{color};color:#fff;padding:8px 14px;'
        f'text-decoration:none;border-radius:4px">Open the alarm</a></p>'
        if link
        else ""
    )
    body = (
        '<!DOCTYPE html>\n<html><body style="font-family:Arial,Helvetica,sans-serif;color:#222">'
        f'<div style="border-top:4px solid {color};padding:12px 0">{logo_html} '
        f'<strong style="color:{color};font-size:18px">{e(brand.name)}</strong></div>'
        f'<h2 style="margin:8px 0"><span style="background:{badge};color:#fff;padding:2px 8px;border-radius:3px">'
        f"{e(n.severity.upper())}</span> {e(n.rule_name)}</h2>"
        f"<p>{e(_reading(n))} on <strong>{e(n.device)}</strong> ({e(_state_label(n))})</p>"
        f"<table>{table}</table>{button}"
        f'<p style="color:#888;font-size:12px">Sent by Sensormine for {e(n.tenant_name)}.</p>'
        "</body></html>\n"
    )
    return subject, text, body


def render_text(n: Notification) -> str:
    """The SMS: headline, time and link, within 160 characters where the names allow."""
    when = n.ts.strftime("%H:%MZ")
    text = f"{_headline(n)} {when}"
    link = _http_url(n.link)
    if link and len(text) + 1 + len(link) <= SMS_MAX_CHARS:
        text += " " + link
    if len(text) <= SMS_MAX_CHARS:
        return text
    # Too long: shorten the rule name (the device and the reading are what an operator acts on).
    rule, over = _line(n.rule_name), len(text) - SMS_MAX_CHARS
    if len(rule) - over - 3 >= 8:
        text = text.replace(rule, rule[: len(rule) - over - 3] + "...", 1)
    return text if len(text) <= SMS_MAX_CHARS else text[: SMS_MAX_CHARS - 3] + "..."


def _json_number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def webhook_payload(n: Notification) -> dict[str, Any]:
    """The webhook body (version 1, documented in docs/notifications.md)."""
    return {
        "id": n.event_id,
        "event": n.event,
        "version": PAYLOAD_VERSION,
        "occurred_at": n.ts.isoformat().replace("+00:00", "Z"),
        "tenant": {"id": n.tenant_id, "name": n.tenant_name},
        "alarm": {
            "id": n.alarm_id,
            "rule": n.rule_name,
            "severity": n.severity,
            "state": n.state,
            "level": n.level,
            "link": n.link,
        },
        "device": {"id": n.device_id, "name": n.device_name},
        # JSON has no NaN or infinity: such a reading goes out as null (the text still says "nan").
        "reading": {"metric": n.metric, "value": _json_number(n.value), "condition": n.condition},
        "text": _headline(n),
    }


# -- delivery results and the shared retry policy ------------------------------------------------


@dataclass
class Delivery:
    """What one send did: delivered, failed (not retried) or dead (retries used up)."""

    channel: Channel
    target: str
    status: Status
    attempts: int  # requests made (0 when the target was refused before any)
    last_error: str | None = None
    status_code: int | None = None  # the last HTTP status, or the SMTP reply code of a refused e-mail

    @property
    def ok(self) -> bool:
        """True when delivered."""
        return self.status == "delivered"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: wait `backoff`, then twice that, ... at most `max_backoff`, for `max_attempts` tries."""

    max_attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff < 0:
            raise ValueError("max_attempts must be at least 1 and backoff not negative")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based); a server's Retry-After wins if longer."""
        wait = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        return min(max(wait, retry_after), self.max_backoff) if retry_after is not None else wait


def _retry_after(response: httpx.Response) -> float | None:
    """A Retry-After header given in seconds (the HTTP-date form is ignored)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _retryable(code: int) -> bool:
    """5xx and 429 may pass on a later try; any other 4xx will not."""
    return code == 429 or code >= 500


def post_with_retry(
    attempt: Callable[[], httpx.Response],
    *,
    channel: Channel,
    target: str,
    policy: RetryPolicy,
    sleep: Sleep,
) -> Delivery:
    """Run `attempt` (one HTTP request) until a 2xx, a permanent failure, or the policy's last try."""
    error: str | None = None
    code: int | None = None
    for n in range(1, policy.max_attempts + 1):
        retry_after: float | None = None
        try:
            response = attempt()
        except httpx.HTTPError as exc:  # connection refused, timeouts, protocol errors
            error, code = f"{type(exc).__name__}: {exc}", None
        else:
            code = response.status_code
            if 200 <= code < 300:
                return Delivery(channel, target, "delivered", n, None, code)
            snippet = _line(response.text[:200])
            error = f"HTTP {code}" + (f": {snippet}" if snippet else "")
            if not _retryable(code):
                return Delivery(channel, target, "failed", n, error, code)
            retry_after = _retry_after(response)
        if n < policy.max_attempts:
            sleep(policy.delay(n, retry_after))
    return Delivery(channel, target, "dead", policy.max_attempts, error, code)


# -- e-mail ----------------------------------------------------------------------------------------


class EmailChannel:
    """Alarm e-mails through an SMTP server: smtp://[user:password@]host[:port] or smtps:// (implicit TLS)."""

    def __init__(self, smtp_url: str, sender: str, *, timeout: float = 10.0) -> None:
        self.server = SmtpServer(smtp_url, timeout=timeout)
        self.sender = sender

    def message(self, n: Notification, recipients: list[str]) -> EmailMessage:
        """The MIME message: multipart/alternative, plain text then HTML."""
        subject, text, body = render_email(n)
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(recipients)
        msg["Date"] = format_datetime(n.ts)
        msg["Message-ID"] = f"<{n.event_id}@sensormine>"
        msg["X-Sensormine-Event"] = n.event
        msg["X-Sensormine-Alarm"] = _line(n.alarm_id)
        msg.set_content(text)
        msg.add_alternative(body, subtype="html")
        return msg

    def send(self, n: Notification, recipients: list[str]) -> Delivery:
        """Send one message to all `recipients`; one attempt (the alarm's lifecycle decides on resending)."""
        target = ", ".join(recipients)
        if not recipients:
            return Delivery("email", target, "failed", 0, "no recipients")
        try:
            refused = self.server.send(self.message(n, recipients), self.sender, recipients)
        except smtplib.SMTPRecipientsRefused as exc:
            return Delivery("email", target, "failed", 1, f"every recipient refused: {exc.recipients}")
        except smtplib.SMTPResponseException as exc:
            return Delivery("email", target, "failed", 1, f"SMTP {exc.smtp_code}: {exc.smtp_error!r}", exc.smtp_code)
        except (smtplib.SMTPException, OSError) as exc:
            return Delivery("email", target, "failed", 1, f"cannot send through {redacted(self.server.url)}: {exc}")
        # Some recipients refused, the others accepted: delivered, saying who was not.
        return Delivery("email", target, "delivered", 1, f"refused: {refused}" if refused else None)


# -- webhooks --------------------------------------------------------------------------------------


def sign(secret: str, timestamp: int | str, body: bytes | str) -> str:
    """`sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>`, the X-Sensormine-Signature value."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    timestamp: int | str,
    body: bytes | str,
    header: str,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """True if `header` signs `timestamp` and the raw `body` with `secret` and the timestamp is recent."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False  # a replay of an old, correctly signed request
    return hmac.compare_digest(sign(secret, ts, body), header.strip())


@dataclass
class WebhookChannel:
    """POSTs the alarm as signed JSON to one URL, retrying 5xx, 429 and connection errors with backoff."""

    url: str
    secret: str
    max_attempts: int = 5
    backoff: float = 0.5  # seconds before the second try, doubling after each failure
    sleep: Sleep = time.sleep
    timeout: float = 10.0
    client: httpx.Client | None = field(default=None, repr=False)  # reuse one (or a test transport)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"webhook URL must be http(s), not {self.url!r}")
        if not self.secret:
            raise ValueError("a webhook needs a secret to sign with")

    def body(self, n: Notification) -> bytes:
        """The exact bytes sent and signed (compact JSON, keys in a fixed order)."""
        return json.dumps(webhook_payload(n), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def headers(self, n: Notification, body: bytes) -> dict[str, str]:
        """Content type, event, id and a signature over a fresh timestamp (each try is signed anew)."""
        ts = int(self.clock())
        return {
            "Content-Type": "application/json",
            "User-Agent": "Sensormine-Webhooks/1",
            "X-Sensormine-Event": n.event,
            "X-Sensormine-Delivery": n.event_id,
            "X-Sensormine-Timestamp": str(ts),
            "X-Sensormine-Signature": sign(self.secret, ts, body),
        }

    def send(self, n: Notification) -> Delivery:
        """Deliver `n`; never raises for the receiver's or the network's failures."""
        body = self.body(n)
        policy = RetryPolicy(self.max_attempts, self.backoff)
        with _client(self.client, self.timeout) as client:
            return post_with_retry(
                lambda: client.post(self.url, content=body, headers=self.headers(n, body)),
                channel="webhook",
                target=redacted(self.url),
                policy=policy,
                sleep=self.sleep,
            )


def _client(client: httpx.Client | None, timeout: float) -> AbstractContextManager[httpx.Client]:
    """The caller's client (left open), else a new one closed after the send."""
    return nullcontext(client) if client is not None else httpx.Client(timeout=timeout)


# -- SMS -------------------------------------------------------------------------------------------


class SmsProvider(Protocol):
    """An SMS gateway: send one text to one number, never raising for a delivery failure."""

    def send(self, to: str, text: str) -> Delivery:
        """Deliver `text` to the E.164 number `to`."""
        ...


@dataclass
class HttpSmsProvider:
    """A JSON-over-HTTP SMS gateway: POST {"to", "text"} with a bearer token; webhook retry policy."""

    url: str
    token: str
    max_attempts: int = 5
    backoff: float = 0.5
    sleep: Sleep = time.sleep
    timeout: float = 10.0
    client: httpx.Client | None = field(default=None, repr=False)

    def send(self, to: str, text: str) -> Delivery:
        """POST the message; a number that is not E.164 fails without a request."""
        if not _E164.fullmatch(to):
            return Delivery("sms", to, "failed", 0, f"not an E.164 number: {to!r}")
        headers = {"Authorization": f"Bearer {self.token}", "User-Agent": "Sensormine-SMS/1"}
        with _client(self.client, self.timeout) as client:
            return post_with_retry(
                lambda: client.post(self.url, json={"to": to, "text": text}, headers=headers),
                channel="sms",
                target=to,
                policy=RetryPolicy(self.max_attempts, self.backoff),
                sleep=self.sleep,
            )


class SmsChannel:
    """Alarm texts (`render_text`) through an `SmsProvider`."""

    def __init__(self, provider: SmsProvider) -> None:
        self.provider = provider

    def send(self, n: Notification, to: str) -> Delivery:
        """Text the alarm to one number."""
        return self.provider.send(to, render_text(n))
