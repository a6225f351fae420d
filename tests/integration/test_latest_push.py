"""GET /api/query/latest stays current through PostgreSQL notifications from the hot-store writers."""

from __future__ import annotations

import psycopg
import pytest
from fastapi.testclient import TestClient

from sensormine.clients.hotstore import CopyBatch, HotStoreWriter
from sensormine.reading import Reading
from sensormine.settings import Settings
from serving.main import create_app
from tests.factories import DAY_US, make_tenant, wait_until

pytestmark = pytest.mark.integration


def _latest(client: TestClient, key: str, device: str) -> dict[str, float]:
    body = client.get("/api/query/latest", params={"device_id": device}, headers={"X-API-Key": key}).json()
    return {p["metric"]: p["value"] for p in body["points"]}


def test_new_points_reach_a_cached_device_and_rolled_back_ones_never_do(
    settings: Settings, conn: psycopg.Connection
) -> None:
    key = make_tenant(conn, "acme", ["press"])
    writer = HotStoreWriter(conn)
    writer.write([Reading("acme", "press", "temp", DAY_US, 1.0, 0, DAY_US)])
    conn.commit()
    with TestClient(create_app(settings)) as client:
        assert _latest(client, key, "press") == {"temp": 1.0}  # read from the database, now cached
        cache = client.app.state.latest_cache  # type: ignore[attr-defined]
        assert cache.get("acme", "press") is not None
        # A newer point through the consumer's fast path, and a new metric through the plain one.
        batch = CopyBatch()
        batch.add_readings([Reading("acme", "press", "temp", DAY_US + 10, 2.0, 0, DAY_US)])
        writer.write_batch(batch)
        writer.write([Reading("acme", "press", "rpm", DAY_US + 5, 900.0, 1, DAY_US)])
        conn.commit()
        wait_until(lambda: _latest(client, key, "press") == {"temp": 2.0, "rpm": 900.0}, timeout=10)
        # An older point (arriving late) does not replace the newest.
        writer.write([Reading("acme", "press", "temp", DAY_US + 1, 5.0, 0, DAY_US)])
        conn.commit()
        # A write that rolls back is never announced.
        with pytest.raises(RuntimeError), conn.transaction():
            writer.write([Reading("acme", "press", "temp", DAY_US + 99, 666.0, 0, DAY_US)])
            raise RuntimeError("abort")
        writer.write([Reading("acme", "press", "rpm", DAY_US + 20, 901.0, 0, DAY_US)])  # a marker after both
        conn.commit()
        wait_until(lambda: _latest(client, key, "press")["rpm"] == 901.0, timeout=10)
        assert _latest(client, key, "press") == {"temp": 2.0, "rpm": 901.0}


def test_a_lost_listener_connection_empties_the_cache_and_answers_stay_right(
    settings: Settings, conn: psycopg.Connection
) -> None:
    key = make_tenant(conn, "acme", ["press"])
    writer = HotStoreWriter(conn)
    writer.write([Reading("acme", "press", "temp", DAY_US, 1.0, 0, DAY_US)])
    conn.commit()
    with TestClient(create_app(settings)) as client:
        assert _latest(client, key, "press") == {"temp": 1.0}
        cache = client.app.state.latest_cache  # type: ignore[attr-defined]
        generation = cache.generation
        # Kill the listener's session: it reconnects, and whatever it may have missed is forgotten.
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
        )
        conn.commit()
        writer.write([Reading("acme", "press", "temp", DAY_US + 10, 3.0, 0, DAY_US)])  # maybe missed
        conn.commit()
        wait_until(lambda: cache.generation > generation and cache.listening, timeout=20)
        assert _latest(client, key, "press") == {"temp": 3.0}
