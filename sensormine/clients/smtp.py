"""An SMTP server by URL: smtp://[user:password@]host[:port] or smtps:// (implicit TLS).

Alarm e-mails (`sensormine.alerts.notify.EmailChannel`) and billing notices both send through it.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit


def redacted(url: str) -> str:
    """The URL without credentials or query (where tokens hide), for messages and logs."""
    u = urlsplit(url)
    host = u.hostname or ""
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


class SmtpServer:
    """Where mail goes; `send` opens one connection per message."""

    def __init__(self, smtp_url: str, *, timeout: float = 10.0) -> None:
        u = urlsplit(smtp_url)
        if u.scheme not in ("smtp", "smtps") or not u.hostname:
            raise ValueError(f"SMTP URL must look like smtp://host:port, not {smtp_url!r}")
        self.url = smtp_url
        self.host = u.hostname
        self.port = u.port or (465 if u.scheme == "smtps" else 25)
        self.tls = u.scheme == "smtps"
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password or "")
        self.timeout = timeout

    def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> dict[str, Any]:
        """Send `msg` to `recipients`; the recipients refused (the others accepted). Raises smtplib's
        exceptions (SMTPRecipientsRefused when every one was refused) and OSError."""
        smtp_cls = smtplib.SMTP_SSL if self.tls else smtplib.SMTP
        kwargs: dict[str, Any] = {"context": ssl.create_default_context()} if self.tls else {}
        with smtp_cls(self.host, self.port, timeout=self.timeout, **kwargs) as smtp:
            if self.username:
                smtp.login(self.username, self.password)
            return dict(smtp.send_message(msg, from_addr=parseaddr(sender)[1], to_addrs=recipients))
