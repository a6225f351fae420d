"""Notification channels against real servers: the launcher's SMTP sink, and local HTTP receivers."""

from __future__ import annotations

import json
import mailbox
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sensormine.alerts.notify import (
    Branding,
    EmailChannel,
    HttpSmsProvider,
    Notification,
    SmsChannel,
    WebhookChannel,
    render_text,
    verify_signature,
)
from tests.factories import wait_for
from tests.unit.test_notify import notification as example

pytestmark = pytest.mark.integration

SECRET = "whsec-" + uuid.uuid4().hex


def notification(alarm_id: str) -> Notification:
    """press-1 too hot (the unit tests' example), as one tenant's branded alarm of now."""
    return example(
        alarm_id=alarm_id,
        ts=datetime.now(UTC).replace(microsecond=0),
        link=f"https://sensormine.example/alarms/{alarm_id}",
        branding=Branding("Acme Alerts", color="#e4007c"),
    )


# -- e-mail through the launcher's SMTP service ------------------------------------------------------


def test_email_arrives_in_the_smtp_services_maildir(services: dict[str, str]) -> None:
    alarm_id = f"alarm-{uuid.uuid4().hex}"
    channel = EmailChannel(services["SENSORMINE_SMTP_URL"], "Sensormine <alerts@sensormine.local>")
    delivery = channel.send(notification(alarm_id), ["ops@acme.example", "oncall@acme.example"])
    assert (delivery.channel, delivery.status, delivery.attempts, delivery.last_error) == (
        "email",
        "delivered",
        1,
        None,
    )
    maildir = mailbox.Maildir(services["SENSORMINE_SMTP_MAILDIR"], create=False)

    def ours() -> list[mailbox.MaildirMessage]:
        return [m for m in maildir if m["X-Sensormine-Alarm"] == alarm_id]

    stored = wait_for(ours, "the e-mail in the Maildir")
    assert isinstance(stored, list) and len(stored) == 1
    msg = stored[0]
    assert msg["Subject"] == "[CRITICAL] Motor overheating on press-1: temperature 97.2 > 90"
    assert msg["From"] == "Sensormine <alerts@sensormine.local>"
    assert msg["To"] == "ops@acme.example, oncall@acme.example"
    assert msg["X-RcptTo"] == "ops@acme.example, oncall@acme.example"  # the envelope, as the server saw it
    assert msg["X-MailFrom"] == "alerts@sensormine.local"
    assert msg.get_content_type() == "multipart/alternative"
    parts = {p.get_content_type(): p for p in msg.walk() if isinstance(p, Message) and not p.is_multipart()}
    assert set(parts) == {"text/plain", "text/html"}
    text = parts["text/plain"].get_payload(decode=True).decode()
    html = parts["text/html"].get_payload(decode=True).decode()
    assert "Value:     97.2" in text and "press-1 (dev-0001)" in text and alarm_id in text
    assert "&gt; 90" in html and "#e4007c" in html and "Acme Alerts" in html
    assert f'href="https://sensormine.example/alarms/{alarm_id}"' in html


# -- webhooks and SMS against local HTTP receivers ---------------------------------------------------


@dataclass
class Receiver:
    """A local HTTP endpoint answering a script of statuses (the last one repeats) and recording requests."""

    answers: list[int]
    check: Callable[[dict[str, str], bytes], bool]  # False: answer 401 instead of the scripted status
    requests: list[tuple[dict[str, str], bytes, bool]] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        ok = self.check(headers, body)
        with self.lock:
            self.requests.append((headers, body, ok))
            return self.answers[min(len(self.requests), len(self.answers)) - 1] if ok else 401


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Start receivers on free loopback ports (a thread each); all are shut down after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(answers: list[int], check: Callable[[dict[str, str], bytes], bool]) -> Receiver:
        rec = Receiver(answers, check)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = rec.answer({k.lower(): v for k, v in self.headers.items()}, body)
                reply = json.dumps({"status": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        rec.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/alarms"
        return rec

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def signed(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does first: check the HMAC over the timestamp and the raw body."""
    return verify_signature(
        SECRET, headers.get("x-sensormine-timestamp", ""), body, headers.get("x-sensormine-signature", "")
    )


class NoSleep:
    """Counts the backoff waits and skips them."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_webhook_is_delivered_after_two_server_errors(receiver: Callable[..., Receiver]) -> None:
    rec = receiver([500, 500, 200], signed)
    sleep = NoSleep()
    n = notification(f"alarm-{uuid.uuid4().hex}")
    delivery = WebhookChannel(rec.url, SECRET, sleep=sleep).send(n)
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("delivered", 3, 200)
    assert len(sleep.waits) == 2
    assert len(rec.requests) == 3 and all(ok for _, _, ok in rec.requests)  # every try carried a valid signature
    payloads = [json.loads(body) for _, body, _ in rec.requests]
    assert {p["id"] for p in payloads} == {n.event_id}  # a receiver can drop the doubles
    assert payloads[0]["event"] == "alarm.raised"
    assert payloads[0]["alarm"]["id"] == n.alarm_id
    assert payloads[0]["reading"] == {"metric": "temperature", "value": 97.2, "condition": "> 90"}
    assert rec.requests[0][0]["x-sensormine-delivery"] == n.event_id


def test_webhook_is_dead_after_max_attempts_of_server_errors(receiver: Callable[..., Receiver]) -> None:
    rec = receiver([500], signed)
    sleep = NoSleep()
    delivery = WebhookChannel(rec.url, SECRET, max_attempts=4, sleep=sleep).send(notification("alarm-dead"))
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("dead", 4, 500)
    assert delivery.last_error == 'HTTP 500: {"status": 500}'
    assert len(rec.requests) == 4 and len(sleep.waits) == 3


def test_webhook_client_error_fails_without_retry(receiver: Callable[..., Receiver]) -> None:
    rec = receiver([400], signed)
    sleep = NoSleep()
    delivery = WebhookChannel(rec.url, SECRET, sleep=sleep).send(notification("alarm-400"))
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("failed", 1, 400)
    assert len(rec.requests) == 1 and sleep.waits == []


def test_webhook_with_the_wrong_secret_is_refused_by_the_receiver(receiver: Callable[..., Receiver]) -> None:
    rec = receiver([200], signed)
    delivery = WebhookChannel(rec.url, "not-the-secret", sleep=NoSleep()).send(notification("alarm-forged"))
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("failed", 1, 401)
    assert [ok for _, _, ok in rec.requests] == [False]


def test_webhook_to_a_closed_port_is_dead_after_retries() -> None:
    import socket

    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/hooks"
        sleep = NoSleep()
        delivery = WebhookChannel(url, SECRET, max_attempts=3, sleep=sleep).send(notification("alarm-down"))
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("dead", 3, None)
    assert delivery.last_error is not None and delivery.last_error.startswith("ConnectError")
    assert len(sleep.waits) == 2


def test_sms_reaches_the_gateway_with_bearer_token_and_body(receiver: Callable[..., Receiver]) -> None:
    token = "sms-" + uuid.uuid4().hex
    rec = receiver([202], lambda headers, _body: headers.get("authorization") == f"Bearer {token}")
    n = notification(f"alarm-{uuid.uuid4().hex}")
    delivery = SmsChannel(HttpSmsProvider(rec.url, token, sleep=NoSleep())).send(n, "+4915112345678")
    assert (delivery.channel, delivery.status, delivery.attempts, delivery.status_code) == ("sms", "delivered", 1, 202)
    (headers, body, ok), *_ = rec.requests
    assert ok and headers["content-type"] == "application/json"
    assert json.loads(body) == {"to": "+4915112345678", "text": render_text(n)}
    assert len(render_text(n)) <= 160

    wrong = SmsChannel(HttpSmsProvider(rec.url, "wrong-token", sleep=NoSleep())).send(n, "+4915112345678")
    assert (wrong.status, wrong.attempts, wrong.status_code) == ("failed", 1, 401)
