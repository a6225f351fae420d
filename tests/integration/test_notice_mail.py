"""Quota and billing notices mailed to the tenant's administrators by the API's notice mailer, through the
launcher's SMTP sink: the soft limit at 80 % and the hard limit of the device quota, each mailed once;
a mail server that is down loses nothing (the event waits and is mailed on a later round)."""

from __future__ import annotations

import mailbox
import uuid

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.clients.postgres import METERING, connect
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.users import create_user
from sensormine.metering.events import record_tenant_event
from sensormine.metering.notices import NoticeMailer
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import make_tenant, wait_for

pytestmark = pytest.mark.integration


def _mails(services: dict[str, str], to: str) -> list[mailbox.MaildirMessage]:
    return [
        m for m in mailbox.Maildir(services["SENSORMINE_SMTP_MAILDIR"], create=False) if to in (m["X-RcptTo"] or "")
    ]


def test_the_device_quotas_soft_and_hard_limits_are_mailed_to_the_admins_once(
    settings: Settings, conn: psycopg.Connection, services: dict[str, str]
) -> None:
    if not settings.smtp_url:
        pytest.skip("needs the SMTP sink (sensormine services up)")
    admin_email = f"admin-{uuid.uuid4().hex[:8]}@acme.example"  # the launcher's mailbox is shared by every test
    make_tenant(conn, "acme", [f"d{i}" for i in range(7)], plan="free")  # the free plan allows 10 devices
    create_user(conn, "acme", admin_email, "a-long-password", "tenant_admin")
    key = {"X-API-Key": create_api_key(conn, "acme", "admin", role="tenant_admin")}
    conn.commit()
    with TestClient(
        create_app(settings.model_copy(update={"kafka_bootstrap": None, "notice_mail_interval_s": 0.2}))
    ) as client:
        for i in range(7, 10):
            assert client.post("/api/devices", json={"id": f"d{i}"}, headers=key).status_code == 201
        refused = client.post("/api/devices", json={"id": "d10"}, headers=key)
        assert refused.status_code == 429 and "upgrade the plan" in refused.json()["detail"]
        mails = wait_for(lambda: m if len(m := _mails(services, admin_email)) >= 2 else None, "both quota mails")
        types = sorted(m["X-Sensormine-Notice"] for m in mails)
        assert types == ["quota.devices.exceeded", "quota.devices.warning"]
        warning = next(m for m in mails if m["X-Sensormine-Notice"] == "quota.devices.warning")
        assert "80 % of the free plan's limit: 8 of 10" in warning.get_payload()
        events = client.get("/api/usage/events", headers=key).json()["items"]
        assert all(e["data"].get("emailed_to") == [admin_email] for e in events if e["type"].startswith("quota."))
    assert len(_mails(services, admin_email)) == 2  # once each, however many rounds ran


def test_a_mail_server_that_is_down_loses_no_notice(
    settings: Settings, conn: psycopg.Connection, services: dict[str, str]
) -> None:
    if not settings.smtp_url:
        pytest.skip("needs the SMTP sink (sensormine services up)")
    admin_email = f"admin-{uuid.uuid4().hex[:8]}@acme.example"
    make_tenant(conn, "acme", [])
    create_user(conn, "acme", admin_email, "a-long-password", "tenant_admin")
    data = {"severity": "critical", "message": "Payment of invoice X failed. Pay it by tomorrow."}
    record_tenant_event(conn, "acme", "billing.payment_failed", data, f"test:{uuid.uuid4()}")
    conn.commit()

    def billing(c: psycopg.Connection) -> tuple:
        row = c.execute("SELECT mailed_at IS NOT NULL, mail_attempts, mail_error FROM tenant_events").fetchone()
        c.commit()
        return row

    down = NoticeMailer(lambda: connect(settings, role=METERING), "smtp://127.0.0.1:9", settings.smtp_from)
    assert down.drain_once() == 0
    mailed, attempts, error = billing(conn)
    assert (mailed, attempts) == (False, 1) and "cannot send through smtp://127.0.0.1:9" in error

    up = NoticeMailer(lambda: connect(settings, role=METERING), settings.smtp_url, settings.smtp_from)
    assert up.drain_once() == 1 and up.drain_once() == 0
    assert billing(conn)[:2] == (True, 1)
    (mail,) = wait_for(lambda: _mails(services, admin_email), "the notice mail")
    assert mail["Subject"].startswith("[Sensormine] acme: Payment of invoice X failed")
