"""The alarm path on real services: a simulated spike over MQTT -> daemon -> Kafka -> stream processor ->
alarm in PostgreSQL and on `{env}.{tenant}.alerts` -> e-mail in the SMTP sink and a signed webhook;
acknowledging through the API stops the escalation."""

from __future__ import annotations

import mailbox
import threading
import uuid
from collections.abc import Callable

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from ingest_daemons.mqtt import MqttDaemon
from ingest_daemons.streamproc import StreamProcessor
from sensormine.alerts.notify import verify_signature
from sensormine.alerts.processor import start_processor
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.mqtt import telemetry_topic
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import drain_topic, make_tenant, mqtt_publish, wait_for
from tests.integration.test_alerts import OVERHEAT, Clock
from tests.integration.test_notify_channels import Receiver
from tests.integration.test_notify_channels import receiver as receiver  # the fixture

pytestmark = pytest.mark.e2e


def test_a_spike_reaches_the_inbox_and_the_webhook_and_acknowledging_stops_escalation(
    settings: Settings, conn: psycopg.Connection, services: dict[str, str], receiver: Callable[..., Receiver]
) -> None:
    if not settings.kafka_bootstrap:
        pytest.skip("needs Kafka (sensormine services up)")
    kafka = settings.model_copy(update={"alerts_refresh_s": 0.0, "alerts_group": f"{settings.env}-alerts"})
    ops_key = make_tenant(conn, "acme", ["motor-1"], role="operator")
    conn.commit()
    ops = {"X-API-Key": ops_key}
    oncall = f"oncall-{uuid.uuid4().hex[:8]}@acme.example"
    secret: dict[str, str] = {}
    hook = receiver(
        [200], lambda h, b: verify_signature(secret["s"], h["x-sensormine-timestamp"], b, h["x-sensormine-signature"])
    )
    maildir = mailbox.Maildir(services["SENSORMINE_SMTP_MAILDIR"], create=False)
    with TestClient(create_app(kafka)) as client:
        made = client.post(
            "/api/alerts/channels", json={"id": "hook", "kind": "webhook", "targets": [hook.url]}, headers=ops
        )
        secret["s"] = made.json()["secret"]
        mail = {"id": "oncall", "kind": "email", "targets": [oncall]}
        assert client.post("/api/alerts/channels", json=mail, headers=ops).status_code == 201
        policy = {
            "id": "on-call",
            "levels": [{"after_s": 0, "channels": ["hook", "oncall"]}, {"after_s": 900, "channels": ["oncall"]}],
        }
        assert client.post("/api/alerts/policies", json=policy, headers=ops).status_code == 201
        rule = {**OVERHEAT, "policy_id": "on-call"}
        assert client.post("/api/alerts/rules", json=rule, headers=ops).status_code == 201

        ensure_topics([kafka.telemetry_topic("acme")], settings=kafka)
        clock = Clock()
        stream = StreamProcessor(kafka, processor=start_processor(kafka, clock=clock, ticks=False))
        stop = threading.Event()
        consuming = threading.Thread(target=stream.run, args=(stop,), daemon=True)
        consuming.start()
        daemon = MqttDaemon(kafka).start()
        try:
            spike = [{"ts": f"2026-11-26T10:00:0{i}Z", "values": {"temperature": v}} for i, v in enumerate((70, 96.5))]
            mqtt_publish(kafka, [(telemetry_topic("acme", "motor-1"), orjson.dumps(b)) for b in spike])
            (alarm,) = wait_for(lambda: client.get("/api/alerts/alarms", headers=ops).json()["items"], "the alarm", 90)
            assert (alarm["status"], alarm["last_value"], alarm["escalation_level"]) == ("active", 96.5, 1)
            wait_for(lambda: hook.requests, "the webhook", 60)
            _, body, verified = hook.requests[0]
            assert verified and orjson.loads(body)["event"] == "alarm.raised"
            wait_for(lambda: [m for m in maildir if oncall in (m["X-RcptTo"] or "")], "the e-mail", 60)
            events = drain_topic(kafka.kafka_bootstrap or "", kafka.alerts_topic("acme"))
            assert [orjson.loads(m.value())["event"] for m in events] == ["alarm.raised"]

            assert client.post(f"/api/alerts/alarms/{alarm['id']}/acknowledge", headers=ops).status_code == 200
            clock.now += 3600  # level 2 would be due by now
            assert stream.processor.tick() == []
        finally:
            daemon.stop()
            stop.set()
            consuming.join(30)
            stream.close()
        log = client.get(f"/api/alerts/alarms/{alarm['id']}/deliveries", headers=ops).json()
        assert sorted((d["channel"], d["level"], d["status"]) for d in log) == [
            ("email", 1, "delivered"),
            ("webhook", 1, "delivered"),
        ]
