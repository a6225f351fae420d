"""SMTP: a local mail sink (aiosmtpd, from the project's Python dependencies) storing into a Maildir."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from sensormine.services import process, system
from sensormine.services.base import Progress, Record, Service


def smtp_greets(port: int, timeout: float = 2.0) -> bool:
    """Read the server's greeting and expect a 220 (no client library, no message sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        ok = s.recv(512).startswith(b"220")
        s.sendall(b"QUIT\r\n")
        return ok


class Smtp(Service):
    """aiosmtpd on loopback accepting mail for anyone; every message lands in `<service dir>/maildir`."""

    name = "smtp"
    ready_timeout = 30.0
    stop_grace = 5.0

    @property
    def maildir(self) -> Path:
        """The Maildir received messages are stored in (new/ holds the unread ones)."""
        return self.dir / "maildir"

    def requirements(self) -> list[system.Requirement]:
        """None from apt: aiosmtpd comes with the project's Python dependencies."""
        return []

    def start(self, previous: Record | None, progress: Progress) -> Record:
        """Spawn `python -m sensormine.services.smtp_server` with this interpreter (the venv's)."""
        port = process.free_port(previous.port if previous else None)
        log = self.dir / "smtp.log"
        cmd: list[str | Path] = [
            sys.executable, "-m", "sensormine.services.smtp_server",
            "--host", "127.0.0.1", "--port", str(port), "--maildir", self.maildir,
        ]  # fmt: skip
        progress(f"smtp: starting aiosmtpd on 127.0.0.1:{port} ...")
        proc = process.spawn(cmd, log=log, cwd=self.dir)
        return self.record(proc.pid, port, f"smtp://127.0.0.1:{port}", log, extra={"maildir": str(self.maildir)})

    def probe(self, rec: Record) -> bool:
        """The 220 greeting."""
        return smtp_greets(rec.port)

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_SMTP_URL and SENSORMINE_SMTP_MAILDIR."""
        return {"SENSORMINE_SMTP_URL": rec.url, "SENSORMINE_SMTP_MAILDIR": rec.extra.get("maildir", str(self.maildir))}
