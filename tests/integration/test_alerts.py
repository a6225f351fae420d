"""Alarm rules and alarms on real services: rules through the API, readings through HTTP ingest (the
in-process path evaluates them), the alarm lifecycle in PostgreSQL, absence on a controllable clock."""

from __future__ import annotations

import mailbox
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb

from ingest_daemons.mqtt import MqttDaemon
from sensormine.alerts import usecases
from sensormine.alerts.notify import verify_signature
from sensormine.alerts.processor import AlarmProcessor, start_processor
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.mqtt import telemetry_topic
from sensormine.clients.postgres import ALERTS, connect
from sensormine.devices.registry import create_device
from sensormine.identity.api_keys import create_api_key
from sensormine.identity.credentials import operator_identity
from sensormine.reading import Reading, datetime_to_us
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant
from serving.main import create_app
from tests.factories import make_tenant, mqtt_publish, wait_for
from tests.integration.test_notify_channels import Receiver
from tests.integration.test_notify_channels import receiver as receiver  # the fixture

pytestmark = pytest.mark.integration

OVERHEAT = {
    "id": "overheat",
    "name": "Motor overheating",
    "severity": "critical",
    "condition": {"kind": "threshold", "metric": "temperature", "op": "gt", "value": 90, "hysteresis": 5},
}


def ingest(client: TestClient, key: str, *points: tuple[int, float]) -> None:
    items = [{"ts": f"2026-11-26T00:00:{s:02d}Z", "values": {"temperature": v}} for s, v in points]
    resp = client.post("/api/ingest", content=orjson.dumps(items), headers={"X-Device-Key": key})
    assert resp.status_code == 200, resp.text


@pytest.fixture
def in_process(settings: Settings) -> Settings:
    """No Kafka: HTTP ingest writes in-process and the alarm processor evaluates behind it."""
    return settings.model_copy(update={"kafka_bootstrap": None, "alerts_refresh_s": 0.0})


@pytest.fixture
def acme(conn: psycopg.Connection) -> dict[str, str]:
    create_tenant(conn, "acme", plan="pro")
    _, device_key = create_device(conn, "acme", "press-1", device_type="press")
    keys = {"device": device_key, "operator": create_api_key(conn, "acme", "ops", role="operator")}
    conn.commit()
    return keys


def test_an_alarm_is_raised_repeated_acknowledged_and_cleared(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    ops = {"X-API-Key": acme["operator"]}
    with TestClient(create_app(in_process)) as client:
        resp = client.post("/api/alerts/rules", json=OVERHEAT, headers=ops)
        assert resp.status_code == 201, resp.text
        assert resp.json()["condition_text"] == "temperature > 90"
        ingest(client, acme["device"], (0, 80.0), (1, 95.0), (2, 97.5))
        alarms = client.get("/api/alerts/alarms", headers=ops).json()["items"]
        assert len(alarms) == 1, alarms
        alarm = alarms[0]
        assert (alarm["status"], alarm["acknowledged"], alarm["count"], alarm["severity"]) == (
            "active",
            False,
            2,
            "critical",
        )
        assert (alarm["first_value"], alarm["last_value"], alarm["device_id"]) == (95.0, 97.5, "press-1")

        # The same batch again (a retry): readings dedupe, and the alarm does not count them twice.
        ingest(client, acme["device"], (1, 95.0), (2, 97.5))
        url = f"/api/alerts/alarms/{alarm['id']}"
        assert client.get(url, headers=ops).json()["count"] == 2

        assert client.post(f"{url}/acknowledge", headers=ops).json()["acknowledged"] is True
        assert client.post(f"{url}/comment", json={"text": "cooling fan replaced"}, headers=ops).status_code == 200
        # 88 is inside the hysteresis band: still up. 84 clears it.
        ingest(client, acme["device"], (3, 88.0))
        assert client.get(url, headers=ops).json()["status"] == "active"
        ingest(client, acme["device"], (4, 84.0))
        done = client.get(url, headers=ops).json()
        assert (done["status"], done["cleared_by"], done["last_value"]) == ("cleared", "rule", 84.0)
        history = [e["kind"] for e in client.get(f"{url}/history", headers=ops).json()]
        assert history == ["raised", "acknowledged", "commented", "cleared"]
        # Above the limit again: a new alarm.
        ingest(client, acme["device"], (5, 99.0))
        assert len(client.get("/api/alerts/alarms?status=active", headers=ops).json()["items"]) == 1
    audit = [r[0] for r in conn.execute("SELECT action FROM audit_log ORDER BY id").fetchall()]
    assert audit == ["alert_rule.create", "alarm.acknowledge", "alarm.comment"]


def test_a_manual_clear_is_not_undone_by_the_next_reading(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    ops = {"X-API-Key": acme["operator"]}
    with TestClient(create_app(in_process)) as client:
        assert client.post("/api/alerts/rules", json=OVERHEAT, headers=ops).status_code == 201
        ingest(client, acme["device"], (1, 95.0))
        (alarm,) = client.get("/api/alerts/alarms", headers=ops).json()["items"]
        url = f"/api/alerts/alarms/{alarm['id']}"
        cleared = client.post(f"{url}/clear", headers=ops).json()
        assert (cleared["status"], cleared["cleared_by"]) == ("cleared", f"key:{acme['operator'].split('_')[1]}")
        ingest(client, acme["device"], (2, 96.0), (3, 97.0))  # still hot: no new alarm, no change
        alarms = client.get("/api/alerts/alarms", headers=ops).json()["items"]
        assert [(a["id"], a["status"], a["count"]) for a in alarms] == [(alarm["id"], "cleared", 1)]
        # Nor after a restart: the evaluator restores the hand-cleared alarm as still held up.
        restarted = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0)
        try:
            hot = Reading(
                "acme", "press-1", "temperature", datetime_to_us(datetime(2026, 11, 26, 0, 0, 3, 500_000)), 98.0
            )
            assert restarted.process([hot]) == []
        finally:
            restarted.close()
        assert len(client.get("/api/alerts/alarms", headers=ops).json()["items"]) == 1
        ingest(client, acme["device"], (4, 50.0), (5, 95.0))  # the condition cleared, then held again
        alarms = client.get("/api/alerts/alarms", headers=ops).json()["items"]
        assert [a["status"] for a in alarms] == ["active", "cleared"]


def test_rules_cascade_to_sub_tenants_and_a_sub_tenant_overrides_by_name(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    create_tenant(conn, "plant-a", parent_id="acme")
    create_tenant(conn, "plant-b", parent_id="acme")
    key_a = create_device(conn, "plant-a", "press-a")[1]
    key_b = create_device(conn, "plant-b", "press-b")[1]
    b_ops = {"X-API-Key": create_api_key(conn, "plant-b", "ops", role="operator")}
    conn.commit()
    ops = {"X-API-Key": acme["operator"]}
    with TestClient(create_app(in_process)) as client:
        assert client.post("/api/alerts/rules", json=OVERHEAT, headers=ops).status_code == 201
        quiet = {**OVERHEAT, "id": "quiet", "enabled": False}  # the same name: plant-b switches it off
        assert client.post("/api/alerts/rules", json=quiet, headers=b_ops).status_code == 201
        ingest(client, key_a, (1, 95.0))
        ingest(client, key_b, (1, 95.0))
        a = client.get("/api/alerts/alarms?tenant_id=plant-a", headers=ops).json()["items"]
        assert [(x["tenant_id"], x["rule_tenant_id"], x["rule_id"]) for x in a] == [("plant-a", "acme", "overheat")]
        assert client.get("/api/alerts/alarms?tenant_id=plant-b", headers=ops).json()["items"] == []
        # plant-b sees its own alarms only; the parent's rules are not its to change.
        assert client.get("/api/alerts/alarms?tenant_id=plant-a", headers=b_ops).status_code == 404
        assert (
            client.patch("/api/alerts/rules/overheat?tenant_id=acme", json={"for_s": 5}, headers=b_ops).status_code
            == 404
        )


def test_bad_rules_get_problem_answers(in_process: Settings, acme: dict[str, str]) -> None:
    ops = {"X-API-Key": acme["operator"]}
    with TestClient(create_app(in_process)) as client:
        bad = client.post(
            "/api/alerts/rules",
            json={**OVERHEAT, "condition": {"kind": "threshold", "metric": "t", "op": "gt"}},
            headers=ops,
        )
        assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
        assert "takes `value`" in bad.json()["detail"]
        assert client.post("/api/alerts/rules", json=OVERHEAT, headers=ops).status_code == 201
        again = client.post("/api/alerts/rules", json=OVERHEAT, headers=ops)
        assert again.status_code == 409 and "already has a rule" in again.json()["detail"]
        assert client.get("/api/alerts/alarms/not-a-uuid", headers=ops).status_code == 404
        changed = client.patch("/api/alerts/rules/overheat", json={"for_s": 60}, headers=ops).json()
        assert changed["condition_text"] == "temperature > 90 for 60 s" and changed["revision"] > 0
        assert client.delete("/api/alerts/rules/overheat", headers=ops).status_code == 204
        assert client.get("/api/alerts/rules/overheat", headers=ops).status_code == 404


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_absence_raises_on_the_timer_and_clears_when_the_device_reports(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    ops = {"X-API-Key": acme["operator"]}
    silent = {"id": "silent", "severity": "warning", "condition": {"kind": "absence", "after_s": 600}}
    clock = Clock()
    with TestClient(create_app(in_process)) as client:
        assert client.post("/api/alerts/rules", json=silent, headers=ops).status_code == 201
        processor = AlarmProcessor(lambda: connect(in_process, role=ALERTS), clock=clock, refresh_s=0)
        try:
            assert processor.tick() == []  # registered just now: not silent for 600 s yet
            clock.now += 601
            (raised,) = processor.tick()
            assert (raised.kind, raised.alarm.device_id, raised.alarm.rule_id) == ("raised", "press-1", "silent")
            assert processor.tick() == []  # up once
            # A second processor (another process) ticking the same moment adds nothing.
            other = AlarmProcessor(lambda: connect(in_process, role=ALERTS), clock=clock, refresh_s=0)
            assert other.tick() == []
            other.close()
            ingest(client, acme["device"], (1, 20.0))
            # HTTP ingest records the device's last message (device status, flushed on close).
            client.app.state.ingest_gate.close()
            clock.now = time.time() + 1
            (cleared,) = wait_for(processor.tick, "the absence alarm to clear")
            assert cleared.kind == "cleared"
        finally:
            processor.close()


def test_a_restarted_processor_does_not_raise_open_alarms_again(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    ops = {"X-API-Key": acme["operator"]}
    with TestClient(create_app(in_process)) as client:
        assert client.post("/api/alerts/rules", json=OVERHEAT, headers=ops).status_code == 201
    first = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0)
    hot = [Reading("acme", "press-1", "temperature", s * 1_000_000, 95.0) for s in range(1, 4)]
    assert [c.kind for c in first.process(hot[:1])] == ["raised"]
    first.close()
    second = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0)
    assert second.process(hot[1:]) == []  # updates of the open alarm, not a new one
    # The same reading evaluated again (a replay) changes nothing.
    again = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0)
    assert again.process(hot) == []
    second.close()
    again.close()
    rows = conn.execute("SELECT status, count FROM alarms").fetchall()
    assert rows == [("active", 3)]
    events = conn.execute("SELECT kind FROM alarm_events").fetchall()
    assert events == [("raised",)]


def test_a_raised_alarm_emails_the_rules_recipients_through_the_smtp_server(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str], services: dict[str, str]
) -> None:
    ops = {"X-API-Key": acme["operator"]}
    to = f"ops-{uuid.uuid4().hex[:8]}@acme.example"
    conn.execute("UPDATE tenants SET branding = %s WHERE id = 'acme'", (Jsonb({"display_name": "ACME Presses"}),))
    conn.commit()
    maildir = mailbox.Maildir(services["SENSORMINE_SMTP_MAILDIR"], create=False)

    def mails() -> list[mailbox.MaildirMessage]:
        return [m for m in maildir if to in (m["X-RcptTo"] or "")]

    with TestClient(create_app(in_process)) as client:
        rule = {**OVERHEAT, "notify": {"emails": [to]}}
        assert client.post("/api/alerts/rules", json=rule, headers=ops).status_code == 201
        ingest(client, acme["device"], (1, 97.25))
        (raised,) = wait_for(mails, "the alarm e-mail")
        assert "[CRITICAL]" in raised["Subject"] and "Motor overheating" in raised["Subject"], raised["Subject"]
        body = raised.as_string()
        assert "97.25" in body and "press-1" in body and "ACME Presses" in body, body
        ingest(client, acme["device"], (2, 20.0))
        wait_for(lambda: len(mails()) == 2, "the cleared e-mail")
        (alarm,) = client.get("/api/alerts/alarms", headers=ops).json()["items"]
        url = f"/api/alerts/alarms/{alarm['id']}/deliveries"

        def logged() -> list[dict] | None:
            got = client.get(url, headers=ops).json()
            return got if len(got) == 2 else None

        log = wait_for(logged, "both deliveries in the log")
        assert [(d["state"], d["channel"], d["target"], d["status"], d["attempts"]) for d in log] == [
            ("raised", "email", to, "delivered", 1),
            ("cleared", "email", to, "delivered", 1),
        ]


def test_the_mqtt_daemon_raises_alarms_on_its_in_process_path(in_process: Settings, conn: psycopg.Connection) -> None:
    make_tenant(conn, "acme", ["m1"])
    conn.commit()
    with psycopg.connect(in_process.database_url or "") as app:
        usecases.create_rule(app, operator_identity(app), "acme", "overheat", OVERHEAT)
    daemon = MqttDaemon(in_process).start()
    try:
        body = {"ts": "2026-11-26T10:00:00Z", "values": {"temperature": 93.5}}
        mqtt_publish(in_process, [(telemetry_topic("acme", "m1"), orjson.dumps(body))])
        rows = wait_for(
            lambda: conn.execute("SELECT device_id, status, last_value FROM alarms").fetchall(), "the alarm"
        )
        conn.commit()
    finally:
        daemon.stop()
    assert rows == [("m1", "active", 93.5)]


def test_escalation_notifies_level_by_level_reminds_and_stops_on_acknowledge(
    in_process: Settings,
    conn: psycopg.Connection,
    acme: dict[str, str],
    services: dict[str, str],
    receiver: Callable[..., Receiver],
) -> None:
    ops = {"X-API-Key": acme["operator"]}
    admins = f"admins-{uuid.uuid4().hex[:8]}@acme.example"
    maildir = mailbox.Maildir(services["SENSORMINE_SMTP_MAILDIR"], create=False)
    secret: dict[str, str] = {}
    hook = receiver(
        [200], lambda h, b: verify_signature(secret["s"], h["x-sensormine-timestamp"], b, h["x-sensormine-signature"])
    )
    clock = Clock()
    with TestClient(create_app(in_process)) as client:
        made = client.post(
            "/api/alerts/channels", json={"id": "hook", "kind": "webhook", "targets": [hook.url]}, headers=ops
        )
        assert made.status_code == 201, made.text
        secret["s"] = made.json()["secret"]
        assert "secret" not in client.get("/api/alerts/channels/hook", headers=ops).json()
        mail = {"id": "admins", "kind": "email", "targets": [admins]}
        assert client.post("/api/alerts/channels", json=mail, headers=ops).status_code == 201
        policy = {
            "id": "on-call",
            "levels": [{"after_s": 0, "channels": ["hook"]}, {"after_s": 900, "channels": ["admins"]}],
            "repeat_s": 600,
        }
        assert client.post("/api/alerts/policies", json=policy, headers=ops).status_code == 201
        bad = client.post("/api/alerts/rules", json={**OVERHEAT, "policy_id": "nope"}, headers=ops)
        assert bad.status_code == 422 and "nope" in bad.json()["detail"]
        assert (
            client.post("/api/alerts/rules", json={**OVERHEAT, "policy_id": "on-call"}, headers=ops).status_code == 201
        )

        processor = start_processor(in_process, clock=clock, ticks=False)
        try:
            hot = Reading("acme", "press-1", "temperature", 1_000_000, 95.0)
            (raised,) = processor.process([hot])
            assert (raised.kind, raised.alarm.escalation_level) == ("raised", 1)
            wait_for(lambda: hook.requests, "the level-1 webhook")
            _, body, verified = hook.requests[0]
            assert verified and orjson.loads(body)["event"] == "alarm.raised"
            clock.now += 899
            assert processor.tick() == []  # level 2 is not due yet
            clock.now += 2
            # A delivery being logged for the alarm right now (its foreign key share-locks the row)
            # must not hide the due escalation from the tick.
            conn.execute(
                "INSERT INTO alarm_deliveries (tenant_id, alarm_id, state, channel, target, status, attempts) "
                "VALUES ('acme', %s, 'raised', 'webhook', 'x', 'delivered', 1)",
                (raised.alarm.id,),
            )
            (escalated,) = processor.tick()
            conn.rollback()
            assert (escalated.kind, escalated.level) == ("escalated", 2)
            clock.now += 601
            (reminded,) = processor.tick()
            assert (reminded.kind, reminded.level) == ("reminder", 2)
            wait_for(lambda: len([m for m in maildir if admins in (m["X-RcptTo"] or "")]) == 2, "two e-mails to admins")
            url = f"/api/alerts/alarms/{raised.alarm.id}"
            assert client.post(f"{url}/acknowledge", headers=ops).status_code == 200
            clock.now += 3600
            assert processor.tick() == []  # acknowledged: no more reminders
            processor.notify.drain()  # type: ignore[union-attr]
            log = client.get(f"{url}/deliveries", headers=ops).json()
            assert [(d["state"], d["level"], d["channel"], d["status"]) for d in log] == [
                ("raised", 1, "webhook", "delivered"),
                ("escalated", 2, "email", "delivered"),
                ("reminder", 2, "email", "delivered"),
            ]
            history = [(e["kind"], e["actor"]) for e in client.get(f"{url}/history", headers=ops).json()]
            assert [k for k, _ in history] == ["raised", "escalated", "reminded", "acknowledged"]
            assert len(hook.requests) == 1  # level 1 only once
        finally:
            processor.close()


def test_texts_go_through_the_tenants_own_sms_gateway_inherited_below_it_else_the_deployments(
    in_process: Settings, conn: psycopg.Connection, receiver: Callable[..., Receiver]
) -> None:
    tokens = {"acme": "acme-" + uuid.uuid4().hex, "deployment": "deploy-" + uuid.uuid4().hex}
    gateways = {
        k: receiver([202], lambda h, b, t=t: h.get("authorization") == f"Bearer {t}") for k, t in tokens.items()
    }
    keys = {
        "acme": make_tenant(conn, "acme", ["a1"]),
        "acme-east": make_tenant(conn, "acme-east", ["e1"], parent_id="acme"),
        "other": make_tenant(conn, "other", ["o1"]),
    }
    conn.commit()
    settings = in_process.model_copy(update={"sms_url": gateways["deployment"].url, "sms_token": tokens["deployment"]})
    with TestClient(create_app(settings)) as client:
        acme = {"X-API-Key": keys["acme"]}
        put = client.put(
            "/api/alerts/sms-provider", json={"url": gateways["acme"].url, "token": tokens["acme"]}, headers=acme
        )
        assert put.status_code == 200 and "token" not in put.json(), put.text
        shown = client.get("/api/alerts/sms-provider", headers=acme).json()
        assert shown["url"] == gateways["acme"].url and "token" not in shown
        bad = client.put("/api/alerts/sms-provider", json={"url": "ftp://x", "token": "long-enough"}, headers=acme)
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
        east = {"X-API-Key": keys["acme-east"]}
        none = client.get("/api/alerts/sms-provider", headers=east)
        assert none.status_code == 404 and "parent's" in none.json()["detail"]
        for tenant in ("acme-east", "other"):  # each with its own SMS channel, policy and rule
            h = {"X-API-Key": keys[tenant]}
            sms = {"id": "pager", "kind": "sms", "targets": ["+4915112345678"]}
            assert client.post("/api/alerts/channels", json=sms, headers=h).status_code == 201
            policy = {"id": "on-call", "levels": [{"after_s": 0, "channels": ["pager"]}]}
            assert client.post("/api/alerts/policies", json=policy, headers=h).status_code == 201
            rule = {**OVERHEAT, "policy_id": "on-call"}
            assert client.post("/api/alerts/rules", json=rule, headers=h).status_code == 201

        processor = start_processor(settings, ticks=False)
        try:
            raised = processor.process(
                [Reading(t, d, "temperature", 1_000_000, 95.0) for t, d in (("acme-east", "e1"), ("other", "o1"))]
            )
            assert sorted(c.alarm.tenant_id for c in raised) == ["acme-east", "other"]
            processor.notify.drain()  # type: ignore[union-attr]
            # acme-east has no gateway of its own: its parent's; `other` has none up its tree: the deployment's.
            got = {k: [(orjson.loads(b)["to"], ok) for _, b, ok in g.requests] for k, g in gateways.items()}
            assert got == {"acme": [("+4915112345678", True)], "deployment": [("+4915112345678", True)]}

            assert client.delete("/api/alerts/sms-provider", headers=acme).status_code == 204
            assert client.get("/api/alerts/sms-provider", headers=acme).status_code == 404
            (cleared,) = processor.process(
                [
                    Reading("acme-east", "e1", "temperature", 2_000_000, 20.0),
                ]
            )
            assert cleared.kind == "cleared"
            processor.notify.drain()  # type: ignore[union-attr]
            assert len(gateways["acme"].requests) == 1 and len(gateways["deployment"].requests) == 2
            log = client.get(f"/api/alerts/alarms/{cleared.alarm.id}/deliveries", headers=east).json()
            assert [(d["state"], d["channel"], d["status"]) for d in log] == [
                ("raised", "sms", "delivered"),
                ("cleared", "sms", "delivered"),
            ]
        finally:
            processor.close()
    audit = conn.execute(
        "SELECT action, detail::text FROM audit_log WHERE action LIKE 'alert_sms_provider.%' ORDER BY id"
    ).fetchall()
    assert [a for a, _ in audit] == ["alert_sms_provider.set", "alert_sms_provider.delete"]
    assert all(tokens["acme"] not in (d or "") for _, d in audit)  # never the token


def test_a_dry_run_counts_how_often_a_rule_would_have_fired_on_stored_data(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    now = datetime_to_us(datetime.now(UTC)) // 1_000_000 * 1_000_000
    minute = 60_000_000
    values = [50.0] * 60
    for spike in (10, 30, 50):  # three excursions above 90, each for two minutes
        values[spike] = values[spike + 1] = 95.0
    HotStoreWriter(conn).write(
        [Reading("acme", "press-1", "temperature", now - (60 - i) * minute, v) for i, v in enumerate(values)]
    )
    conn.commit()
    ops = {"X-API-Key": acme["operator"]}
    with TestClient(create_app(in_process)) as client:
        body = {"condition": OVERHEAT["condition"], "hours": 2}
        got = client.post("/api/alerts/rules/dry-run", json=body, headers=ops).json()
        assert (got["devices"], got["readings"], got["fired"], got["cleared"]) == (1, 60, 3, 3), got
        assert [e["kind"] for e in got["events"]] == ["raise", "clear"] * 3
        # Held for two minutes each time: a 3-minute duration never fires.
        longer = client.post("/api/alerts/rules/dry-run", json={**body, "for_s": 180}, headers=ops).json()
        assert longer["fired"] == 0
        silent = {"condition": {"kind": "absence", "after_s": 600}, "hours": 2}
        assert client.post("/api/alerts/rules/dry-run", json=silent, headers=ops).json()["fired"] == 0
        # Nothing was stored.
        assert client.get("/api/alerts/alarms", headers=ops).json()["items"] == []
        assert client.get("/api/alerts/rules", headers=ops).json()["items"] == []


def test_an_anomaly_rule_raises_on_a_vibration_spike_scored_by_the_bundled_model(
    in_process: Settings, conn: psycopg.Connection
) -> None:
    make_tenant(conn, "acme", ["m1"])
    conn.execute("UPDATE devices SET device_type = 'motor'")
    conn.commit()
    knock = {"name": "Bearing knock (model)", "condition": {"kind": "anomaly", "metric": "vibration", "above": 0.6}}
    with psycopg.connect(in_process.database_url or "") as app:
        usecases.create_rule(app, operator_identity(app), "acme", "knock", knock)
    rng = random.Random(1)
    calm = [Reading("acme", "m1", "vibration", (i + 1) * 1_000_000, 2.8 + rng.gauss(0, 0.2)) for i in range(60)]
    spike = Reading("acme", "m1", "vibration", 61_000_000, 11.5)
    processor = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0)
    try:
        assert processor.process(calm) == []
        (raised,) = processor.process([spike])
        assert (raised.kind, raised.alarm.rule_id, raised.alarm.last_value) == ("raised", "knock", 11.5)
        processor.tick()  # writes the inferences counted so far
    finally:
        processor.close()
    usage = conn.execute("SELECT tenant_id, value FROM usage WHERE metric = 'ml_inference'").fetchall()
    assert usage == [("acme", 61)]  # every scored reading is a metered inference


def test_a_dry_run_scores_an_anomaly_rule_with_the_streams_model_and_meters_it(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    conn.execute("UPDATE devices SET device_type = 'motor' WHERE id = 'press-1'")
    now = datetime_to_us(datetime.now(UTC)) // 1_000_000 * 1_000_000
    rng = random.Random(1)
    values = [2.8 + rng.gauss(0, 0.2) for _ in range(60)] + [11.5]  # calm, then a bearing knock
    HotStoreWriter(conn).write(
        [Reading("acme", "press-1", "vibration", now - (61 - i) * 1_000_000, v) for i, v in enumerate(values)]
    )
    conn.commit()
    with TestClient(create_app(in_process)) as client:
        body = {"condition": {"kind": "anomaly", "metric": "vibration", "above": 0.6}, "hours": 1}
        got = client.post("/api/alerts/rules/dry-run", json=body, headers={"X-API-Key": acme["operator"]}).json()
    assert (got["readings"], got["fired"]) == (61, 1), got
    assert got["events"][0]["value"] == 11.5
    usage = conn.execute("SELECT tenant_id, value FROM usage WHERE metric = 'ml_inference'").fetchall()
    assert usage == [("acme", 61)]  # the dry run's inferences are metered like the stream's
    with TestClient(create_app(in_process)) as client:  # and the tenant sees them in its usage
        shown = client.get("/api/usage", headers={"X-API-Key": acme["operator"]}).json()
    assert shown["ml_inference"] == {"used": 61, "limit": None}, shown
    assert [d["ml_inference"] for d in shown["by_day"]] == [61]
    assert {t["tenant_id"]: t["ml_inference"] for t in shown["by_tenant"]} == {"acme": 61}


def test_a_restarted_evaluator_rebuilds_its_state_from_the_hot_store(
    in_process: Settings, conn: psycopg.Connection, acme: dict[str, str]
) -> None:
    """A duration condition that started holding before a crash still fires at the right reading after it."""
    held = {**OVERHEAT, "id": "held", "name": "Hot for a minute", "for_s": 60}
    with psycopg.connect(in_process.database_url or "") as app:
        usecases.create_rule(app, operator_identity(app), "acme", "held", held)
    now = datetime_to_us(datetime.now(UTC)) // 1_000_000 * 1_000_000
    hot = [Reading("acme", "press-1", "temperature", now - (120 - s) * 1_000_000, 95.0) for s in range(0, 50, 5)]
    HotStoreWriter(conn).write(hot)  # stored (and evaluated) before the crash: hot from -120 s to -75 s
    conn.commit()
    later = Reading("acme", "press-1", "temperature", now - 50_000_000, 96.0)  # 70 s after it started
    cold = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0)
    try:
        assert cold.process([later]) == []  # without its history it has held for 0 s
    finally:
        cold.close()
    warm = AlarmProcessor(lambda: connect(in_process, role=ALERTS), refresh_s=0, warmup_s=600)
    try:
        (raised,) = warm.process([later])
        assert (raised.kind, raised.alarm.rule_id, raised.alarm.last_value) == ("raised", "held", 96.0)
    finally:
        warm.close()
