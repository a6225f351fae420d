"""A local SMTP sink: aiosmtpd on loopback, every accepted message stored in a Maildir.

Run by the launcher's `smtp` service as `python -m sensormine.services.smtp_server --port N --maildir D`;
it accepts mail for any recipient, delivers nothing onwards, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mailbox
import signal
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("sensormine.smtp")

HOSTNAME = "sensormine-smtp"


class MaildirHandler:
    """aiosmtpd handler: store the message as received, with the envelope sender and recipients on top."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = mailbox.Maildir(maildir, create=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Add the message to the Maildir (written to tmp/, then moved to new/, so readers never see half)."""
        content = envelope.original_content or b""
        # The envelope is not part of the message (Bcc recipients appear nowhere else), so keep it
        # in headers as aiosmtpd's own Mailbox handler does; the body stays byte for byte as sent.
        top = f"X-MailFrom: {envelope.mail_from}\r\nX-RcptTo: {', '.join(envelope.rcpt_tos)}\r\n".encode()
        key = self.maildir.add((top + content).replace(b"\r\n", b"\n"))
        log.info("stored %s from %s to %s", key, envelope.mail_from, ", ".join(envelope.rcpt_tos))
        return "250 OK"


async def serve(host: str, port: int, maildir: Path) -> None:
    """Serve SMTP on host:port until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    handler = MaildirHandler(maildir)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, ident="Sensormine local SMTP", loop=loop),
        host,
        port,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening on %s:%d, storing into %s", host, port, maildir)
    async with server:
        await stop.wait()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    # The launcher picks the free port, as for every service, so it knows the URL before the server answers.
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every command at INFO, and the launcher's running-checks connect often.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    asyncio.run(serve(args.host, args.port, args.maildir))


if __name__ == "__main__":
    main()
