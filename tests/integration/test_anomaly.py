"""Anomaly models and scores on real PostgreSQL and real Delta tables: training, batch scoring, metering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import psycopg
import pyarrow.compute as pc
import pytest

from assets.anomaly import (
    ANOMALY_MODELS_KEY,
    ANOMALY_SCORES_KEY,
    COMPLETE_CHECK_NAME,
    anomaly_models,
    anomaly_scores,
    anomaly_scores_complete,
)
from assets.telemetry import telemetry_lake, telemetry_partition_key
from ingest_daemons.simulators.train_anomaly_demo import simulated_readings
from lake.anomaly import TABLE_NAME, read_scores
from lake.storage import open_table
from orchestration.resources import resources_for
from sensormine.anomaly.features import table_features
from sensormine.anomaly.metering import ML_INFERENCE, InferenceMeter, meter_inference
from sensormine.anomaly.model import OnnxScorer
from sensormine.anomaly.registry import bundled_models, latest_models
from sensormine.anomaly.stream import StreamScorer
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import ALERTS, LAKE, READER, connect
from sensormine.reading import Reading, datetime_to_us, readings_to_table
from sensormine.settings import Settings
from tests.factories import DAY, make_tenant

pytestmark = pytest.mark.integration

D = DAY.date()


def motor_readings(tenant_id: str, hours: float = 0.5) -> list[Reading]:
    """Simulated motors motor-1 and motor-2 (knocks included) moved onto DAY, for `tenant_id`."""
    table = simulated_readings(2, hours)
    shift = datetime_to_us(DAY) - table["ts"].cast("int64")[0].as_py()
    return [
        Reading(tenant_id, d, m, ts + shift, v, 0, ts + shift)
        for d, m, ts, v in zip(
            table["device_id"].to_pylist(),
            table["metric"].to_pylist(),
            table["ts"].cast("int64").to_pylist(),
            table["value"].to_pylist(),
            strict=True,
        )
    ]


def motors_tenant(conn: psycopg.Connection, tenant_id: str) -> list[Reading]:
    """A tenant with two motors and an untyped device, and their readings of DAY in the hot store."""
    make_tenant(conn, tenant_id, ["motor-1", "motor-2", "gauge"])
    conn.execute("UPDATE devices SET device_type = 'motor' WHERE tenant_id = %s AND id LIKE 'motor-%%'", (tenant_id,))
    rows = motor_readings(tenant_id) + [
        Reading(tenant_id, "gauge", "level", datetime_to_us(DAY) + i * 60_000_000, float(i)) for i in range(10)
    ]
    HotStoreWriter(conn).write(rows)
    conn.commit()
    return rows


def ml_usage(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT tenant_id, value FROM usage WHERE metric = %s", (ML_INFERENCE,)).fetchall())


def test_scores_of_a_compacted_day_are_written_checked_metered_and_replaced_on_rerun(
    conn: psycopg.Connection, lake_settings: Settings
) -> None:
    rows = motors_tenant(conn, "acme")
    motors = [r for r in rows if r.device_id.startswith("motor-")]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme"])
        key = telemetry_partition_key("acme", D)
        resources = resources_for(lake_settings)
        assert dg.materialize([telemetry_lake], partition_key=key, resources=resources, instance=instance).success

        def run() -> dg.ExecuteInProcessResult:
            result = dg.materialize(
                [anomaly_scores, anomaly_scores_complete], partition_key=key, resources=resources, instance=instance
            )
            assert result.success
            [check] = result.get_asset_check_evaluations()
            assert (check.check_name, check.passed) == (COMPLETE_CHECK_NAME, True), check.description
            return result

        first = run()
        [mat] = first.asset_materializations_for_node("lake__anomaly_scores")
        assert mat.metadata["scored"].value == len(motors)
        assert mat.metadata["dagster/row_count"].value == len(rows)
        assert mat.metadata["models"].value == {"bundled/motor": len(motors)}
        scores = read_scores(lake_settings, "acme", D)
        assert scores.num_rows == len(rows)
        # The untyped device's readings are kept, unscored; the motors' scores are the bundled model's on the
        # same features computed in memory.
        unscored = [
            d for d, s in zip(scores["device_id"].to_pylist(), scores["score"].to_pylist(), strict=True) if s is None
        ]
        assert set(unscored) == {"gauge"} and len(unscored) == 10
        ordered, features = table_features(readings_to_table(motors))
        expected = OnnxScorer(bundled_models()["motor"].onnx).score(features)
        got = scores.filter(pc.not_equal(scores["device_id"], "gauge"))
        assert got["ts"].equals(ordered["ts"])
        assert np.array_equal(got["score"].to_numpy(), expected)
        assert ml_usage(conn) == {"acme": len(motors)}
        version = open_table(lake_settings, TABLE_NAME).version()  # type: ignore[union-attr]

        run()
        again = read_scores(lake_settings, "acme", D)
        assert again.equals(scores)  # replaced, not appended
        assert open_table(lake_settings, TABLE_NAME).version() == version + 1  # type: ignore[union-attr]
        # Each run scored the day again and is metered again; a step retried inside one run would not be.
        assert ml_usage(conn) == {"acme": 2 * len(motors)}


def test_training_registers_a_version_per_device_type_which_scoring_then_uses(
    conn: psycopg.Connection, settings: Settings
) -> None:
    motors_tenant(conn, "acme")
    motors_tenant(conn, "globex")
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tenants", ["acme", "globex"])
        resources = resources_for(settings)
        for tenant in ("acme", "globex"):
            key = telemetry_partition_key(tenant, D)
            assert dg.materialize([telemetry_lake], partition_key=key, resources=resources, instance=instance).success
        config = {"days": 2, "end_date": (D + timedelta(days=1)).isoformat(), "min_rows": 100}
        result = dg.materialize(
            [anomaly_models],
            resources=resources,
            instance=instance,
            run_config={"ops": {"ml__anomaly_models": {"config": config}}},
        )
        assert result.success
        [mat] = result.asset_materializations_for_node("ml__anomaly_models")
        assert mat.asset_key == ANOMALY_MODELS_KEY
        assert mat.metadata["versions"].value == {"motor": 1}
        with connect(settings, role=LAKE) as lake:
            [record] = latest_models(lake).values()
        assert (record.version, record.device_type, record.training_rows) == (1, "motor", 2 * 2 * 3 * 1800)
        assert record.window_end == datetime(2026, 11, 27, tzinfo=UTC)
        assert record.window_end - record.window_start == timedelta(days=2)
        assert {"score_p50", "score_p99", "above_threshold"} <= set(record.metrics)

        scored = dg.materialize(
            [anomaly_scores], partition_key=telemetry_partition_key("globex", D), resources=resources, instance=instance
        )
        [mat] = scored.asset_materializations_for_node("lake__anomaly_scores")
        assert mat.asset_key == ANOMALY_SCORES_KEY
        assert mat.metadata["models"].value == {"anomaly_models/1": 2 * 3 * 1800}
    assert ml_usage(conn) == {"globex": 2 * 3 * 1800}


def test_registry_and_inference_metering_respect_the_roles(conn: psycopg.Connection, settings: Settings) -> None:
    make_tenant(conn, "acme", ["m1"])
    conn.execute("UPDATE devices SET device_type = 'motor'")
    conn.commit()
    today = datetime.now(UTC).date()
    with connect(settings, role=LAKE, autocommit=True) as lake:
        assert latest_models(lake) == {}
        with lake.transaction():
            assert meter_inference(lake, "run-1", {("acme", today): 5})
        with lake.transaction():
            assert not meter_inference(lake, "run-1", {("acme", today): 5})  # the same batch again: ignored
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            lake.execute("SELECT count(*) FROM usage")
    assert ml_usage(conn) == {"acme": 5}
    # The stream side: the alerts role (the stream processor's) meters through its InferenceMeter and
    # may read the registry but neither change it nor read usage.
    demo = OnnxScorer(bundled_models()["motor"].onnx)
    meter = InferenceMeter()
    scorer = StreamScorer({"motor": demo}, lambda t, d: "motor", meter)
    scorer.score([Reading("acme", "m1", "rpm", datetime_to_us(DAY) + i * 1_000_000, 1480.0 + i) for i in range(7)])
    with connect(settings, role=ALERTS, autocommit=True) as alerts:
        assert latest_models(alerts) == {}
        assert meter.flush(alerts) == 7
        assert meter.flush(alerts) == 0
        assert meter.unflushed() == {}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            alerts.execute(
                "INSERT INTO anomaly_models (device_type, features, window_start, window_end, "
                "training_rows, onnx, onnx_sha256) VALUES ('x', '{a}', now(), now(), 1, '', '')"
            )
    with connect(settings, role=ALERTS) as alerts, pytest.raises(psycopg.errors.InsufficientPrivilege):
        alerts.execute("SELECT count(*) FROM usage")
    with connect(settings, role=READER) as reader, pytest.raises(psycopg.errors.InsufficientPrivilege):
        reader.execute("SELECT count(*) FROM anomaly_models")  # cross-tenant models are not for API callers
    assert ml_usage(conn) == {"acme": 12}
    # The definer adds ml_inference and nothing else: the API-call counts are not its to touch.
    assert conn.execute("SELECT count(*) FROM usage WHERE metric <> %s", (ML_INFERENCE,)).fetchone() == (0,)
