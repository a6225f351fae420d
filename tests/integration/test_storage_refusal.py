"""Storage beyond the plan refused on every write path, through the real services: the consumer
dead-letters the readings of a quota group that stores its plan's limit (a sub-tenant shares its
parent's), the HTTP ingest answers 403 with the plan and the way out, the in-process path keeps them
in the dead-letter table; a replay is refused until the upgrade, then brings them in once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import psycopg
import pytest
from click.testing import Result
from fastapi.testclient import TestClient

from ingest_daemons.consumer import HotStoreConsumer
from sensormine.clients.kafka import ensure_topics
from sensormine.clients.postgres import INGEST, connect
from sensormine.devices.registry import create_device
from sensormine.ingest.sinks import DirectSink, KafkaSink
from sensormine.metering.usage_events import DATA_INGESTED
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import drain_topic, make_tenant, readings, run_until_idle

pytestmark = pytest.mark.integration

START_US = 1_795_687_200_000_000
REFUSED = "storage quota exceeded: plan free allows 1 GB for tenant 'tiny'"
WAY_OUT = "upgrade the plan (PUT /api/billing/subscription)"


def stores(conn: psycopg.Connection, tenant_id: str, hot_bytes: int) -> None:
    """Today's snapshot of `tenant_id`: what the usage_daily asset would have measured."""
    conn.execute(
        "INSERT INTO tenant_usage_snapshots (tenant_id, day, devices, hot_bytes, lake_bytes) VALUES (%s, %s, 1, %s, 0)",
        (tenant_id, datetime.now(UTC).date(), hot_bytes),
    )
    conn.commit()


def upgrade(conn: psycopg.Connection, tenant_id: str) -> None:
    # What the subscription webhook does once Stripe confirms the new plan (tested with stripe-mock elsewhere).
    conn.execute("UPDATE tenants SET plan = 'pro' WHERE id = %s", (tenant_id,))
    conn.commit()


def stored(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT tenant_id, count(*) FROM telemetry GROUP BY 1").fetchall()
    conn.commit()
    return dict(rows)


def ingested(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT DISTINCT tenant_id FROM usage WHERE metric = %s", (DATA_INGESTED,)).fetchall()
    conn.commit()
    return {r[0] for r in rows}


def consume(settings: Settings) -> HotStoreConsumer:
    return run_until_idle(HotStoreConsumer(settings))


def test_the_consumer_dead_letters_a_full_groups_readings_until_the_upgrade(
    settings: Settings, conn: psycopg.Connection, cli: Callable[..., Result]
) -> None:
    make_tenant(conn, "tiny", ["t1"], plan="free")
    make_tenant(conn, "tiny-lab", ["l1"], parent_id="tiny")  # no plan of its own: shares tiny's quota
    make_tenant(conn, "acme", ["a1"], plan="free")
    stores(conn, "tiny", 1_150_000_000)
    stores(conn, "tiny-lab", 50_000_000)  # the group stores 1.2 GB of the free plan's 1 GB
    stores(conn, "acme", 900_000_000)  # at 90 %: warned (by the rollup), not refused
    tenants = ("tiny", "tiny-lab", "acme")
    ensure_topics([*(settings.telemetry_topic(t) for t in tenants), settings.dlq_topic], settings=settings)
    sink = KafkaSink(settings)
    for tenant, device in (("tiny", "t1"), ("tiny-lab", "l1"), ("acme", "a1")):
        sink.publish(tenant, device, "mqtt", readings(tenant, device, 10, ("temperature",), START_US))
    assert sink.flush(30) == 0

    first = consume(settings)
    assert (first.stats.messages, first.stats.rejected) == (3, 2)
    assert stored(conn) == {"acme": 10}
    assert ingested(conn) == {"acme"}  # refused bytes are not metered as ingested
    dead = drain_topic(settings.kafka_bootstrap, settings.dlq_topic)
    headers = {dict(m.headers())["tenant_id"].decode(): dict(m.headers()) for m in dead}
    assert sorted(headers) == ["tiny", "tiny-lab"]
    tiny = headers["tiny"]["reason"].decode()
    assert tiny.startswith(f"{REFUSED}, which stores 1.20 GB (measured {datetime.now(UTC).date()}); {WAY_OUT}")
    lab = headers["tiny-lab"]["reason"].decode()
    assert lab.startswith(f"{REFUSED} (shared with 'tiny', whose plan applies), which stores 1.20 GB")
    assert {h["quota"] for h in headers.values()} == {b"storage"}

    # Replayed before the upgrade, the readings would only come back: the replay says why and leaves them.
    early = cli("dlq", "replay", "--tenant", "tiny")
    assert early.exit_code == 0, early.output
    assert "still_rejected\tstorage quota exceeded: plan free allows 1 GB" in early.output

    upgrade(conn, "tiny")  # pro allows 50 GB, for the sub-tenant too
    replayed = cli("dlq", "replay", "--reason", "storage quota")
    assert replayed.exit_code == 0, replayed.output
    assert replayed.output.count("resubmitted\t10 readings") == 2, replayed.output
    again = consume(settings)
    assert (again.stats.messages, again.stats.rejected) == (2, 0)
    assert stored(conn) == {"acme": 10, "tiny": 10, "tiny-lab": 10}
    assert ingested(conn) == {"acme", "tiny", "tiny-lab"}
    assert "nothing to replay" in cli("dlq", "replay", "--reason", "storage quota").output


def test_http_ingest_refuses_the_batch_with_the_plan_and_the_way_out(
    settings: Settings, conn: psycopg.Connection
) -> None:
    make_tenant(conn, "tiny", [], plan="free")
    key = create_device(conn, "tiny", "press-1")[1]
    conn.commit()
    stores(conn, "tiny", 1_000_000_000)  # exactly the limit: full
    body = orjson.dumps([{"ts": "2026-12-01T00:00:00Z", "values": {"temp": 20.5}}])
    in_process = settings.model_copy(update={"kafka_bootstrap": None, "storage_quota_recheck_s": 0.0})
    with TestClient(create_app(in_process)) as client:
        refused = client.post("/api/ingest", content=body, headers={"X-Device-Key": key})
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert (problem["title"], problem["kind"]) == ("Storage quota exceeded", "storage")
        assert problem["detail"].startswith(f"{REFUSED}, which stores 1.00 GB")
        assert WAY_OUT in problem["detail"]
        assert problem["detail"].endswith("nothing of this batch was stored: send it again once the plan allows")
        upgrade(conn, "tiny")
        accepted = client.post("/api/ingest", content=body, headers={"X-Device-Key": key})
        assert accepted.status_code == 200, accepted.text
    assert stored(conn) == {"tiny": 1}
    assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_the_in_process_path_keeps_refused_readings_as_dead_letters(
    settings: Settings, conn: psycopg.Connection
) -> None:
    make_tenant(conn, "tiny", ["t1"], plan="free")
    stores(conn, "tiny", 2_000_000_000)
    embedded = settings.model_copy(update={"kafka_bootstrap": None, "storage_quota_recheck_s": 0.0})
    sink = DirectSink(lambda: connect(embedded, role=INGEST), embedded)
    try:
        sink.publish("tiny", "t1", "modbus", readings("tiny", "t1", 5, ("temperature",), START_US))
        upgrade(conn, "tiny")
        sink.publish("tiny", "t1", "modbus", readings("tiny", "t1", 5, ("temperature",), START_US + 60_000_000))
    finally:
        sink.close()
    [(reason, tenant)] = conn.execute("SELECT reason, tenant_id FROM dead_letters").fetchall()
    assert tenant == "tiny" and reason.startswith(f"{REFUSED}, which stores 2.00 GB") and WAY_OUT in reason
    assert stored(conn) == {"tiny": 5}
