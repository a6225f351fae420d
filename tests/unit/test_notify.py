"""Alarm notification templates, webhook signatures and the retry policy, without any server."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes
from email.message import Message

import httpx
import pytest

from sensormine.alerts.notify import (
    Branding,
    EmailChannel,
    HttpSmsProvider,
    Notification,
    RetryPolicy,
    SmsChannel,
    WebhookChannel,
    render_email,
    render_text,
    sign,
    verify_signature,
    webhook_payload,
)

TS = datetime(2026, 12, 3, 5, 43, 7, tzinfo=UTC)


def notification(**changes: object) -> Notification:
    """The alarm of the examples: press-1 too hot."""
    base = Notification(
        tenant_id="acme",
        tenant_name="Acme Plastics",
        alarm_id="alarm-42",
        rule_name="Motor overheating",
        severity="critical",
        state="raised",
        device_id="dev-0001",
        device_name="press-1",
        metric="temperature",
        value=97.2,
        condition="> 90",
        ts=TS,
        link="https://sensormine.example/alarms/alarm-42",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class FakeSleep:
    """Records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def scripted(*answers: int | Exception, seen: list[httpx.Request] | None = None) -> httpx.Client:
    """A client whose server answers with these statuses (or raises these errors), then repeats the last."""
    requests = seen if seen is not None else []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        answer = answers[min(len(requests), len(answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, text="" if answer < 300 else f"status {answer}")

    return httpx.Client(transport=httpx.MockTransport(handle))


# -- templates -------------------------------------------------------------------------------------


def test_email_subject_and_bodies_carry_the_alarm_values() -> None:
    subject, text, body = render_email(notification())
    assert subject == "[CRITICAL] Motor overheating on press-1: temperature 97.2 > 90"
    for part in (text, body):
        for value in ("Motor overheating", "press-1", "dev-0001", "temperature", "97.2", "2026-12-03 05:43:07 UTC"):
            assert value in part
        assert "https://sensormine.example/alarms/alarm-42" in part
    assert "&gt; 90" in body and "> 90" in text


def test_subject_names_the_state_level_and_a_missing_value() -> None:
    escalated = notification(state="escalated", level=2, device_name=None)
    assert render_email(escalated)[0] == (
        "[CRITICAL] Escalated (level 2): Motor overheating on dev-0001: temperature 97.2 > 90"
    )
    silent = notification(severity="major", state="cleared", metric="heartbeat", value=None, condition="silent 5 min")
    assert render_email(silent)[0] == "[MAJOR] Cleared: Motor overheating on press-1: heartbeat silent 5 min"
    assert render_email(notification(value=0.1 + 0.2))[0].endswith("temperature 0.3 > 90")  # no float noise
    assert render_email(notification(value=90.0))[0].endswith("temperature 90 > 90")


def test_html_escapes_every_value_and_drops_unsafe_urls() -> None:
    n = notification(
        rule_name="<script>alert('x')</script>",
        device_name='press "1" & <b>',
        tenant_name="Acme <Plastics>",
        link="javascript:alert(1)",
        branding=Branding("Evil\"'><img src=x>", color="red;background:url(//x)", logo_url="javascript:alert(2)"),
    )
    subject, text, body = render_email(n)
    assert "<script>" not in body and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in body
    assert "press &quot;1&quot; &amp; &lt;b&gt;" in body
    assert "Acme &lt;Plastics&gt;" in body
    assert "<img src=x>" not in body and "Evil&quot;&#x27;&gt;&lt;img src=x&gt;" in body
    assert "javascript:" not in body and "javascript:" not in text  # neither the link nor the logo
    assert "url(//x)" not in body  # a colour that is not #rgb/#rrggbb falls back to the default
    assert "<script>alert('x')</script>" in subject  # plain text stays as written


def test_branding_sets_name_colour_and_logo() -> None:
    brand = Branding("Acme Alerts", color="#e4007c", logo_url="https://cdn.acme.example/logo.png")
    _, text, body = render_email(notification(branding=brand))
    assert body.count("#e4007c") >= 2  # the top border, the name and the button
    assert '<img src="https://cdn.acme.example/logo.png" alt="Acme Alerts"' in body
    assert "Acme Alerts" in text
    _, _, plain = render_email(notification())
    assert "Acme Plastics" in plain and "<img" not in plain and "#1f4e79" in plain  # the default colour


def test_newlines_in_names_cannot_break_subject_or_sms() -> None:
    n = notification(rule_name="Overheat\r\nBcc: victim@example.com", device_name="press\n1")
    subject = render_email(n)[0]
    assert "\n" not in subject and "\r" not in subject
    assert "Overheat Bcc: victim@example.com on press 1" in subject
    assert "\n" not in render_text(n)


def test_sms_is_short_and_keeps_device_and_reading() -> None:
    text = render_text(notification())
    headline = "[CRITICAL] Motor overheating on press-1: temperature 97.2 > 90"
    assert text == f"{headline} 05:43Z https://sensormine.example/alarms/alarm-42"
    assert len(text) <= 160
    long = render_text(notification(rule_name="Motor winding temperature above the manufacturer's limit " * 3))
    assert len(long) <= 160
    assert long.startswith("[CRITICAL] Motor winding") and "press-1: temperature 97.2 > 90 05:43Z" in long
    assert "https://" not in long  # the link is the first thing to go


def test_notification_validates_and_normalises_time() -> None:
    with pytest.raises(ValueError, match="severity"):
        notification(severity="urgent")
    with pytest.raises(ValueError, match="timezone"):
        notification(ts=datetime(2026, 12, 3, 5, 43))
    with pytest.raises(ValueError, match="level"):
        notification(level=0)
    paris = notification(ts=TS.astimezone(timezone(timedelta(hours=1))))
    assert paris.ts.tzinfo is UTC and paris.ts == TS


def test_event_id_is_stable_for_the_same_alarm_state_level_and_time() -> None:
    n = notification()
    assert n.event_id == notification(value=98.0, ts=TS.astimezone(timezone(timedelta(hours=-5)))).event_id
    others = {notification(state="cleared"), notification(level=2), notification(ts=TS + timedelta(seconds=1))}
    others.add(notification(alarm_id="alarm-43"))
    assert n.event_id not in {o.event_id for o in others}
    assert len({o.event_id for o in others}) == 4


def test_webhook_payload_shape() -> None:
    payload = webhook_payload(notification(state="acknowledged"))
    assert payload == {
        "id": notification(state="acknowledged").event_id,
        "event": "alarm.acknowledged",
        "version": 1,
        "occurred_at": "2026-12-03T05:43:07Z",
        "tenant": {"id": "acme", "name": "Acme Plastics"},
        "alarm": {
            "id": "alarm-42",
            "rule": "Motor overheating",
            "severity": "critical",
            "state": "acknowledged",
            "level": 1,
            "link": "https://sensormine.example/alarms/alarm-42",
        },
        "device": {"id": "dev-0001", "name": "press-1"},
        "reading": {"metric": "temperature", "value": 97.2, "condition": "> 90"},
        "text": "[CRITICAL] Acknowledged: Motor overheating on press-1: temperature 97.2 > 90",
    }
    assert webhook_payload(notification(value=float("nan")))["reading"]["value"] is None  # JSON has no NaN


# -- signatures ------------------------------------------------------------------------------------


def test_signature_verifies_and_rejects_wrong_secret_stale_time_and_tampering() -> None:
    body = b'{"event":"alarm.raised"}'
    header = sign("s3cret", 1_790_000_000, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    now = 1_790_000_100.0
    assert verify_signature("s3cret", "1790000000", body, header, now=now)
    assert verify_signature("s3cret", 1_790_000_000, body.decode(), header, now=now)  # str body, int timestamp
    assert not verify_signature("other", "1790000000", body, header, now=now)
    assert not verify_signature("s3cret", "1790000000", body + b" ", header, now=now)
    assert not verify_signature("s3cret", "1790000001", body, header, now=now)  # timestamp is signed too
    assert not verify_signature("s3cret", "1790000000", body, header, now=1_790_000_301.0)  # stale
    assert not verify_signature("s3cret", "1790000000", body, header, now=1_789_999_000.0)  # from the future
    assert verify_signature("s3cret", "1790000000", body, header, tolerance_s=400, now=1_790_000_301.0)
    assert not verify_signature("s3cret", "yesterday", body, header, now=now)


def test_webhook_request_is_signed_with_a_fresh_timestamp_each_try() -> None:
    seen: list[httpx.Request] = []
    clock = iter([1_790_000_000.0, 1_790_000_007.0])
    channel = WebhookChannel(
        "https://hooks.example/in?token=abc",
        "s3cret",
        sleep=FakeSleep(),
        client=scripted(503, 200, seen=seen),
        clock=lambda: next(clock),
    )
    delivery = channel.send(notification())
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("delivered", 2, 200)
    assert delivery.target == "https://hooks.example/in"  # no token in results or logs
    assert [r.headers["X-Sensormine-Timestamp"] for r in seen] == ["1790000000", "1790000007"]
    for r in seen:
        ts = r.headers["X-Sensormine-Timestamp"]
        assert verify_signature("s3cret", ts, r.content, r.headers["X-Sensormine-Signature"], now=float(ts))
        assert r.headers["X-Sensormine-Event"] == "alarm.raised"
        assert r.headers["X-Sensormine-Delivery"] == json.loads(r.content)["id"] == notification().event_id
        assert r.headers["Content-Type"] == "application/json"
    assert seen[0].content == seen[1].content  # same bytes, so the same id and a valid signature each time


# -- the retry policy ------------------------------------------------------------------------------


def test_retry_backs_off_exponentially_until_delivered() -> None:
    sleep = FakeSleep()
    channel = WebhookChannel("http://hooks.example/", "k", backoff=0.5, sleep=sleep, client=scripted(500, 502, 200))
    delivery = channel.send(notification())
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("delivered", 3, None)
    assert sleep.waits == [0.5, 1.0]


def test_retry_gives_up_dead_after_max_attempts() -> None:
    sleep = FakeSleep()
    seen: list[httpx.Request] = []
    channel = WebhookChannel("http://hooks.example/", "k", max_attempts=5, sleep=sleep, client=scripted(503, seen=seen))
    delivery = channel.send(notification())
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("dead", 5, 503)
    assert delivery.last_error == "HTTP 503: status 503"
    assert len(seen) == 5 and sleep.waits == [0.5, 1.0, 2.0, 4.0]  # no wait after the last try


def test_client_errors_fail_at_once_but_429_and_connection_errors_retry() -> None:
    sleep = FakeSleep()
    bad = WebhookChannel("http://hooks.example/", "k", sleep=sleep, client=scripted(400)).send(notification())
    assert (bad.status, bad.attempts, bad.status_code, sleep.waits) == ("failed", 1, 400, [])
    refused = httpx.ConnectError("connection refused")
    flaky = WebhookChannel("http://hooks.example/", "k", sleep=sleep, client=scripted(refused, 429, 204))
    delivery = flaky.send(notification())
    assert (delivery.status, delivery.attempts, delivery.status_code) == ("delivered", 3, 204)
    down = WebhookChannel("http://hooks.example/", "k", max_attempts=2, sleep=FakeSleep(), client=scripted(refused))
    dead = down.send(notification())
    assert (dead.status, dead.attempts, dead.status_code) == ("dead", 2, None)
    assert dead.last_error == "ConnectError: connection refused"


def test_retry_after_is_honoured_within_the_cap() -> None:
    policy = RetryPolicy(max_attempts=5, backoff=0.5, max_backoff=30.0)
    assert [policy.delay(a) for a in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(3, retry_after=1.0) == 2.0  # our own backoff when it is longer
    assert policy.delay(1, retry_after=3600.0) == 30.0

    sleep = FakeSleep()

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200) if sleep.waits else httpx.Response(429, headers={"Retry-After": "7"})

    client = httpx.Client(transport=httpx.MockTransport(handle))
    assert WebhookChannel("http://hooks.example/", "k", sleep=sleep, client=client).send(notification()).ok
    assert sleep.waits == [7.0]


def test_webhook_needs_an_http_url_and_a_secret() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookChannel("ftp://hooks.example/", "k")
    with pytest.raises(ValueError, match="secret"):
        WebhookChannel("https://hooks.example/", "")


# -- SMS -------------------------------------------------------------------------------------------


def test_sms_provider_posts_json_with_bearer_token_and_shares_the_retry_policy() -> None:
    seen: list[httpx.Request] = []
    sleep = FakeSleep()
    provider = HttpSmsProvider("https://sms.example/send", "tok", sleep=sleep, client=scripted(500, 202, seen=seen))
    delivery = SmsChannel(provider).send(notification(), "+4915112345678")
    assert (delivery.channel, delivery.target, delivery.status, delivery.attempts) == (
        "sms",
        "+4915112345678",
        "delivered",
        2,
    )
    assert sleep.waits == [0.5]
    assert seen[-1].headers["Authorization"] == "Bearer tok"
    assert json.loads(seen[-1].content) == {"to": "+4915112345678", "text": render_text(notification())}


def test_sms_refuses_a_number_that_is_not_e164_without_a_request() -> None:
    seen: list[httpx.Request] = []
    provider = HttpSmsProvider("https://sms.example/send", "tok", client=scripted(200, seen=seen))
    delivery = provider.send("0151 1234", "hello")
    assert (delivery.status, delivery.attempts, seen) == ("failed", 0, [])


# -- e-mail without a server -----------------------------------------------------------------------


def test_email_message_is_multipart_alternative_text_then_html() -> None:
    channel = EmailChannel("smtp://127.0.0.1:2525", "Sensormine <alerts@sensormine.local>")
    msg = message_from_bytes(channel.message(notification(), ["a@example.com", "b@example.com"]).as_bytes())
    assert msg.get_content_type() == "multipart/alternative"
    parts = [p for p in msg.walk() if isinstance(p, Message) and not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert msg["To"] == "a@example.com, b@example.com"
    assert msg["From"] == "Sensormine <alerts@sensormine.local>"
    assert msg["Message-ID"] == f"<{notification().event_id}@sensormine>"


def test_email_to_an_unreachable_server_fails_with_a_clear_error() -> None:
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        delivery = EmailChannel(f"smtp://127.0.0.1:{port}", "alerts@sensormine.local", timeout=5).send(
            notification(), ["ops@example.com"]
        )
    assert (delivery.channel, delivery.status, delivery.attempts) == ("email", "failed", 1)
    assert delivery.last_error is not None
    assert f"cannot send through smtp://127.0.0.1:{port}" in delivery.last_error
    assert "refused" in delivery.last_error.lower()
    assert EmailChannel("smtp://127.0.0.1:25", "a@b").send(notification(), []).last_error == "no recipients"
    with pytest.raises(ValueError, match="smtp://"):
        EmailChannel("http://127.0.0.1:25", "a@b")
