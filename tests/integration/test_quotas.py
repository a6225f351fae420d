"""Rate limits, monthly quotas, device quotas and usage flushing against the real Redis and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime

import psycopg
import pytest

from sensormine.clients.postgres import METERING
from sensormine.clients.postgres import connect as pg_connect
from sensormine.clients.redis import key_prefix, make_redis
from sensormine.identity.api_keys import create_api_key
from sensormine.limits.backends import RedisBackend
from sensormine.limits.devices import QuotaExceeded, check_device_quota
from sensormine.limits.quotas import Quotas
from sensormine.metering.calendar import month_label
from sensormine.metering.ledger import API_CALLS, FLUSH_BATCH_MEMBERS, UsageFlusher, write_batch
from sensormine.settings import Settings
from sensormine.tenancy.plans import Plan, get_plan
from sensormine.tenancy.tenants import create_tenant
from tests.conftest import admin_url_of

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC)  # one minute before the month ends
TINY = Plan("tiny", 10, 1, 10, hot_retention_days=7, lake_retention_days=90)  # 10 calls a month, no rate limit
METERED = Plan("metered", None, None, None, hot_retention_days=7, lake_retention_days=None)  # counted, unlimited


@pytest.fixture
def backend(settings: Settings) -> Iterator[RedisBackend]:
    """A Redis backend under the test's own key prefix; its keys are deleted afterwards."""
    client = make_redis(settings)
    yield RedisBackend(client, key_prefix(settings))
    _forget_redis(client, key_prefix(settings))
    client.close()


def _forget_redis(client, prefix: str) -> None:
    """What a Redis restart does to this test's keys (FLUSHDB would wipe other tests' keys too)."""
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def _connect(settings: Settings):
    def connect() -> AbstractContextManager[psycopg.Connection]:
        return pg_connect(settings, role=METERING)

    return connect


def _quotas(settings: Settings, backend: RedisBackend, now: datetime = NOW) -> Quotas:
    return Quotas(backend, _connect(settings), flush_interval_s=0.2, clock=lambda: now)


def _events(conn: psycopg.Connection, tenant_id: str) -> list[tuple[str, dict]]:
    rows = conn.execute(
        "SELECT type, data FROM tenant_events WHERE tenant_id = %s ORDER BY id", (tenant_id,)
    ).fetchall()
    conn.commit()
    return [(r[0], r[1]) for r in rows]


def _add_device(conn: psycopg.Connection, tenant_id: str, device_id: str) -> None:
    conn.execute(
        "INSERT INTO devices (tenant_id, id, name, key_hash) VALUES (%s, %s, %s, %s)",
        (tenant_id, device_id, device_id, f"test:{tenant_id}/{device_id}"),
    )


def _usage(conn: psycopg.Connection, tenant_id: str) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(value), 0) FROM usage WHERE tenant_id = %s AND metric = %s", (tenant_id, API_CALLS)
    ).fetchone()
    conn.commit()
    assert row is not None
    return int(row[0])


def test_bucket_allows_the_burst_then_refuses_then_refills(backend: RedisBackend) -> None:
    results = [backend.take_token("acme", 1, 20) for _ in range(20)]
    assert all(r.allowed for r in results)
    assert [r.remaining for r in results][-3:] == [2, 1, 0]
    refused = backend.take_token("acme", 1, 20)
    assert not refused.allowed
    assert 1 <= refused.retry_after_ms <= 1000  # one token a second
    time.sleep(refused.retry_after_ms / 1000 + 0.05)
    assert backend.take_token("acme", 1, 20).allowed  # refilled by the time elapsed
    assert not backend.take_token("acme", 1, 20).allowed
    assert backend.take_token("globex", 1, 20).allowed  # buckets are per tenant


def test_bucket_through_quotas_raises_with_retry_after(settings: Settings, backend: RedisBackend, conn) -> None:
    create_tenant(conn, "acme")
    quotas = _quotas(settings, backend)
    slow = Plan("slow", 10, 1, 1000, hot_retention_days=7, lake_retention_days=90, rate_per_s=0.5, burst=20)
    for _ in range(20):
        quotas.check_call("acme", "acme", slow)
    with pytest.raises(QuotaExceeded) as err:
        quotas.check_call("acme", "acme", slow)
    assert err.value.retry_after_s == 2
    assert err.value.info["kind"] == "rate"
    assert "plan slow allows 0.5 requests a second (bursts of 20)" in err.value.detail
    assert backend.month_count("acme", month_label(NOW)) == 20  # refused calls are not counted


def test_bucket_is_atomic_under_concurrency(backend: RedisBackend) -> None:
    burst, threads, attempts = 50, 8, 40
    allowed = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def hammer() -> None:
        start.wait()
        mine = sum(backend.take_token("acme", 0.001, burst).allowed for _ in range(attempts))
        with lock:
            allowed.append(mine)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(allowed) == burst  # never more than the bucket held, never fewer


def test_monthly_quota_warns_at_80_percent_refuses_beyond_and_records_each_event_once(
    settings: Settings, backend: RedisBackend, conn: psycopg.Connection
) -> None:
    create_tenant(conn, "acme")
    quotas = _quotas(settings, backend)
    answers = [quotas.check_call("acme", "acme", TINY) for _ in range(10)]
    assert [a.warning is not None for a in answers] == [False] * 7 + [True] * 3
    assert "80% of the monthly API-call quota used (8 of 10, plan tiny)" in (answers[7].warning or "")
    assert answers[-1].quota_used == 10
    assert answers[-1].quota_reset_s == 60
    with pytest.raises(QuotaExceeded) as err:
        quotas.check_call("acme", "acme", TINY)
    assert err.value.retry_after_s == 60  # until 2026-12-01 00:00 UTC
    assert err.value.info == {"kind": "api_calls", "plan": "tiny", "limit": 10, "used": 10}
    assert "resume on 2026-12-01" in err.value.detail
    # Another API process (its own memory) and a Redis that forgot its markers: still one event each.
    other = _quotas(settings, backend)
    with pytest.raises(QuotaExceeded):
        other.check_call("acme", "acme", TINY)
    for key in backend.client.scan_iter(match=backend.prefix + "once:*"):
        backend.client.delete(key)
    with pytest.raises(QuotaExceeded):
        _quotas(settings, backend).check_call("acme", "acme", TINY)
    events = _events(conn, "acme")
    assert [t for t, _ in events] == ["quota.api_calls.warning", "quota.api_calls.exceeded"]
    assert events[0][1] == {
        "metric": "api_calls",
        "threshold_percent": 80,
        "used": 8,
        "limit": 10,
        "plan": "tiny",
        "month": "2026-11",
    }
    # A new month starts from zero.
    december = _quotas(settings, backend, datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC))
    assert december.check_call("acme", "acme", TINY).quota_used == 1


def test_sub_tenants_without_a_plan_share_the_parents_quota(
    settings: Settings, backend: RedisBackend, conn: psycopg.Connection
) -> None:
    create_tenant(conn, "acme")
    create_tenant(conn, "plant-1", parent_id="acme")
    quotas = _quotas(settings, backend)
    for _ in range(6):
        quotas.check_call("acme", "acme", TINY)
    for _ in range(4):
        quotas.check_call("acme", "plant-1", TINY)
    with pytest.raises(QuotaExceeded):
        quotas.check_call("acme", "plant-1", TINY)
    quotas.flusher.flush()
    assert (_usage(conn, "acme"), _usage(conn, "plant-1")) == (6, 4)  # metered per tenant, for chargeback


def test_device_quota_counts_the_quota_group(conn: psycopg.Connection) -> None:
    create_tenant(conn, "acme")  # free: 10 devices
    create_tenant(conn, "plant-1", parent_id="acme")  # shares acme's quota
    create_tenant(conn, "lab", parent_id="acme", plan="pro")  # its own quota
    for i in range(7):
        _add_device(conn, "acme", f"a{i}")
    _add_device(conn, "lab", "l0")
    conn.commit()

    assert check_device_quota(conn, "plant-1", 1).devices == 8  # 80 %: a warning event
    _add_device(conn, "plant-1", "p0")
    conn.commit()
    quota = check_device_quota(conn, "acme", 2)
    assert (quota.quota_tenant, quota.plan, quota.limit, quota.devices) == ("acme", "free", 10, 10)
    conn.commit()
    with pytest.raises(QuotaExceeded) as err:
        check_device_quota(conn, "plant-1", 3)
    conn.rollback()
    detail = err.value.detail
    assert "plan free allows 10 devices for tenant 'acme'" in detail and "shared with 'acme'" in detail
    assert "upgrade the plan or delete devices" in detail
    assert err.value.retry_after_s > 0
    assert check_device_quota(conn, "lab", 5).devices == 6  # pro: 100 devices, its own count
    conn.commit()
    assert [t for t, _ in _events(conn, "acme")] == ["quota.devices.warning", "quota.devices.exceeded"]
    assert _events(conn, "lab") == []


def test_device_quota_under_a_sub_tenants_row_level_security(conn: psycopg.Connection) -> None:
    from sensormine.clients.postgres import tenant_scope

    create_tenant(conn, "acme")
    create_tenant(conn, "plant-1", parent_id="acme")
    for i in range(9):
        _add_device(conn, "acme", f"a{i}")  # invisible to plant-1's session, yet its quota
    conn.commit()
    with tenant_scope(conn, ["plant-1"], write=True):
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (0,)
        assert check_device_quota(conn, "plant-1", 1).devices == 10
    with pytest.raises(QuotaExceeded), tenant_scope(conn, ["plant-1"], write=True):
        check_device_quota(conn, "plant-1", 2)
    assert [t for t, _ in _events(conn, "acme")] == ["quota.devices.warning", "quota.devices.exceeded"]


def test_device_quota_holds_under_concurrent_creation(settings: Settings, conn: psycopg.Connection) -> None:
    create_tenant(conn, "acme")
    conn.commit()
    created = []
    start = threading.Barrier(6)

    def create(i: int) -> None:
        with psycopg.connect(admin_url_of(settings)) as c:
            start.wait()
            for j in range(4):
                try:
                    with c.transaction():
                        check_device_quota(c, "acme", 1)
                        _add_device(c, "acme", f"d{i}-{j}")
                    created.append(1)
                except QuotaExceeded:
                    pass

    workers = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(created) == 10
    row = conn.execute("SELECT count(*) FROM devices WHERE tenant_id = 'acme'").fetchone()
    assert row is not None and row[0] == 10


def test_flush_moves_counts_exactly_once_across_crashes(
    settings: Settings, backend: RedisBackend, conn: psycopg.Connection
) -> None:
    create_tenant(conn, "acme", plan="pro")
    create_tenant(conn, "plant-1", parent_id="acme")
    conn.commit()
    quotas = _quotas(settings, backend)

    def calls(n: int, tenant: str = "acme") -> None:
        for _ in range(n):
            quotas.check_call("acme", tenant, METERED)

    calls(37)
    calls(5, "plant-1")
    # Crash 1: the process dies right after moving the counters to a pending batch.
    moved = backend.take_batch(FLUSH_BATCH_MEMBERS)
    assert moved is not None and sum(moved.counts.values()) == 42
    calls(11)
    # Crash 2: dies after the database committed a batch, before deleting it from Redis.
    written = backend.take_batch(FLUSH_BATCH_MEMBERS)
    assert written is not None
    with pg_connect(settings, role=METERING) as c:
        assert write_batch(c, written)
    assert _usage(conn, "acme") == 11
    calls(3)
    # The restarted process completes both pending batches, then flushes the live counters.
    restarted = UsageFlusher(backend, _connect(settings), interval_s=0.1)
    restarted.start()
    restarted.close()
    assert (_usage(conn, "acme"), _usage(conn, "plant-1")) == (37 + 11 + 3, 5)
    assert backend.pending_batches() == []
    assert restarted.flush() == 0  # nothing left, nothing counted twice
    assert (_usage(conn, "acme"), _usage(conn, "plant-1")) == (51, 5)
    assert backend.month_count("acme", month_label(NOW)) == 56


def test_background_flusher_flushes_on_its_own_and_on_close(
    settings: Settings, backend: RedisBackend, conn: psycopg.Connection
) -> None:
    create_tenant(conn, "acme", plan="enterprise")
    conn.commit()
    quotas = _quotas(settings, backend)
    quotas.start()
    try:
        enterprise = get_plan("enterprise")
        for _ in range(25):
            assert quotas.check_call("acme", "acme", enterprise).quota_limit is None  # counted, never refused
        deadline = time.monotonic() + 10
        while _usage(conn, "acme") < 25 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _usage(conn, "acme") == 25
        for _ in range(4):
            quotas.check_call("acme", "acme", enterprise)
    finally:
        quotas.close()
    assert _usage(conn, "acme") == 29


def test_redis_loss_reseeds_the_month_from_the_usage_table(
    settings: Settings, backend: RedisBackend, conn: psycopg.Connection
) -> None:
    create_tenant(conn, "acme")
    create_tenant(conn, "plant-1", parent_id="acme")
    conn.commit()
    quotas = _quotas(settings, backend)
    for _ in range(5):
        quotas.check_call("acme", "acme", TINY)
    for _ in range(2):
        quotas.check_call("acme", "plant-1", TINY)
    quotas.flusher.flush()
    _forget_redis(backend.client, backend.prefix)  # Redis restarted without persistence
    assert backend.month_count("acme", month_label(NOW)) is None
    assert quotas.check_call("acme", "acme", TINY).quota_used == 8  # 7 from the usage table, plus this one
    quotas.check_call("acme", "acme", TINY)
    quotas.check_call("acme", "acme", TINY)
    with pytest.raises(QuotaExceeded):
        quotas.check_call("acme", "acme", TINY)


def test_redis_down_admits_calls_unlimited(settings: Settings, conn: psycopg.Connection) -> None:
    create_tenant(conn, "acme")
    conn.commit()
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    quotas = _quotas(settings, RedisBackend(make_redis(dead), key_prefix(dead)))
    answer = quotas.check_call("acme", "acme", TINY)
    assert answer.quota_used is None and answer.warning is None


# --- through the API --------------------------------------------------------------------------


def test_api_answers_429_with_retry_after_and_warns(settings: Settings, conn: psycopg.Connection) -> None:
    from fastapi.testclient import TestClient

    from serving.limits import start_limits, stop_limits
    from serving.main import create_app

    create_tenant(conn, "acme")  # free: 10 000 calls a month, 10/s in bursts of 20
    key = create_api_key(conn, "acme", "test")
    conn.commit()
    app = create_app(settings)
    with TestClient(app) as client:
        started_here = getattr(app.state, "quotas", None) is None
        if started_here:  # until the app's lifespan starts the limits itself
            start_limits(app, settings)
        try:
            quotas: Quotas = app.state.quotas
            backend = quotas.backend
            assert isinstance(backend, RedisBackend)
            month = month_label(datetime.now(UTC))
            headers = {"X-API-Key": key}

            ok = client.get("/api/auth/me", headers=headers)
            assert ok.status_code == 200, ok.text
            assert ok.headers["X-RateLimit-Limit"] == "20"
            assert ok.headers["X-Quota-Limit"] == "10000"
            assert ok.headers["X-Quota-Remaining"] == "9999"
            assert "X-Quota-Warning" not in ok.headers

            backend.client.set(backend.month_key("acme", month), 7_999)
            warned = client.get("/api/auth/me", headers=headers)
            assert warned.status_code == 200
            assert warned.headers["X-Quota-Warning"].startswith("80% of the monthly API-call quota used")

            backend.client.set(backend.month_key("acme", month), 10_000)
            refused = client.get("/api/auth/me", headers=headers)
            assert refused.status_code == 429
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert int(refused.headers["Retry-After"]) >= 1
            body = refused.json()
            assert body["status"] == 429 and body["kind"] == "api_calls" and body["plan"] == "free"
            assert "used its 10 000 API calls" in body["detail"]

            backend.client.delete(backend.month_key("acme", month))
            for _ in range(200):  # 20 at once, then 10 a second: the bucket runs dry
                limited = client.get("/api/auth/me", headers=headers)
                if limited.status_code == 429:
                    break
            assert limited.status_code == 429, "the burst of 20 must run out"
            assert limited.json()["kind"] == "rate"
            assert limited.headers["Retry-After"] == "1"
            assert limited.headers["X-RateLimit-Remaining"] == "0"
            assert [t for t, _ in _events(conn, "acme")] == ["quota.api_calls.warning", "quota.api_calls.exceeded"]
        finally:
            if started_here:
                stop_limits(app)
    _forget_redis(make_redis(settings), key_prefix(settings))


def test_http_ingest_has_its_own_rate_per_plan(settings: Settings, conn: psycopg.Connection) -> None:
    from fastapi.testclient import TestClient

    from sensormine.devices.registry import create_device
    from serving.main import create_app

    create_tenant(conn, "acme")  # free: 10 requests a second in bursts of 20, for ingest as for API calls
    _, device_key = create_device(conn, "acme", "press")
    api_key = create_api_key(conn, "acme", "test")
    conn.commit()
    body = b'{"ts": "2026-11-26T00:00:00Z", "values": {"t": 1}}'
    direct = settings.model_copy(update={"kafka_bootstrap": None})
    with TestClient(create_app(direct)) as client:
        statuses = []
        for _ in range(60):  # far faster than 10 a second: the burst runs out
            resp = client.post("/api/ingest", content=body, headers={"X-Device-Key": device_key})
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                break
        assert statuses[:20] == [200] * 20 and statuses[-1] == 429, statuses
        problem = resp.json()
        assert problem["kind"] == "ingest_rate" and problem["plan"] == "free" and resp.headers["Retry-After"] == "1"
        assert "send larger batches" in problem["detail"]
        # Ingest has a bucket of its own: the tenant's API calls still pass, and are not counted against it.
        assert client.get("/api/auth/me", headers={"X-API-Key": api_key}).status_code == 200
    _forget_redis(make_redis(settings), key_prefix(settings))
