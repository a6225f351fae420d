"""Anomaly assets: per device type models trained from lake history, and per tenant-day ONNX scores.

* `ml/anomaly_models` (not partitioned): for each device type, the features of its devices'
  readings in the lake over the last `days` days (every tenant with devices of that type), an
  IsolationForest trained and converted to ONNX, registered as a new version in `anomaly_models`.
* `lake/anomaly_scores` (partitioned like telemetry): the tenant-day's lake readings, their
  features, scored with each device type's newest model (or the bundled one); the partition of
  the Delta table `{lake}/anomaly_scores` replaced whole. Scored rows are metered per tenant as
  `ml_inference`, once per run and partition.
* check `anomaly_scores_complete` (blocking): one row per lake reading, no key twice, every score
  finite in (0, 1].
"""

import warnings
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import numpy as np
import pyarrow.compute as pc

from assets.telemetry import TELEMETRY_LAKE_KEY, HotStore, Lake, parse_partition_key, telemetry_partitions
from lake.anomaly import TABLE_NAME, read_scores, training_features, write_scores
from lake.quality import lake_row_count
from lake.storage import table_uri
from sensormine.anomaly.metering import meter_inference
from sensormine.anomaly.model import train
from sensormine.anomaly.registry import models_for, register_model

ANOMALY_MODELS_KEY = dg.AssetKey(["ml", "anomaly_models"])
ANOMALY_SCORES_KEY = dg.AssetKey(["lake", TABLE_NAME])
COMPLETE_CHECK_NAME = "anomaly_scores_complete"


class AnomalyTrainingConfig(dg.Config):
    """Which history trains the models."""

    days: int = 7
    """Days of lake history before `end_date` (UTC)."""
    end_date: str | None = None
    """Exclusive end of the window, YYYY-MM-DD; tomorrow (so today included) when unset."""
    device_types: list[str] | None = None
    """Device types to train; every type with devices when unset."""
    min_rows: int = 1_000
    """Feature rows a type needs before a model is trained for it."""
    seed: int = 0


@dg.asset(
    key=ANOMALY_MODELS_KEY,
    deps=[TELEMETRY_LAKE_KEY],
    required_resource_keys={"hot_store", "lake"},
    group_name="anomaly",
    kinds={"onnx", "sklearn", "postgres"},
    description="Per device type an IsolationForest on the anomaly features of the lake's recent readings "
    "(every tenant with devices of that type), converted to ONNX and registered as a new version in anomaly_models.",
)
def anomaly_models(context: dg.AssetExecutionContext, config: AnomalyTrainingConfig) -> dg.MaterializeResult:
    """Train and register one model version per device type with enough history."""
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    settings = lake.settings()
    end_day = date.fromisoformat(config.end_date) if config.end_date else datetime.now(UTC).date() + timedelta(days=1)
    end = datetime(end_day.year, end_day.month, end_day.day, tzinfo=UTC)
    start = end - timedelta(days=config.days)
    with hot_store.connect() as conn:
        rows = conn.execute(
            "SELECT device_type, tenant_id, id FROM devices WHERE device_type IS NOT NULL "
            "AND (%s::text[] IS NULL OR device_type = ANY(%s)) ORDER BY 1, 2, 3",
            (config.device_types, config.device_types),
        ).fetchall()
    by_type: dict[str, dict[str, set[str]]] = {}
    for kind, tenant_id, device_id in rows:
        by_type.setdefault(kind, {}).setdefault(tenant_id, set()).add(device_id)
    registered: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for kind, devices in sorted(by_type.items()):
        features, readings = training_features(settings, devices, start, end)
        if features.shape[0] < config.min_rows:
            skipped[kind] = f"{features.shape[0]} feature rows < min_rows {config.min_rows}"
            continue
        model = train(kind, features, start, end, seed=config.seed)
        with hot_store.connect() as conn, conn.transaction():
            version = register_model(conn, model)
        registered[kind] = version
        context.log.info(
            f"{kind}: version {version} from {readings} readings of {len(devices)} tenants, {model.metrics}"
        )
    return dg.MaterializeResult(
        metadata={
            "window_start": dg.MetadataValue.timestamp(start),
            "window_end": dg.MetadataValue.timestamp(end),
            "versions": dg.MetadataValue.json(registered),
            "skipped": dg.MetadataValue.json(skipped),
        }
    )


@dg.asset(
    key=ANOMALY_SCORES_KEY,
    deps=[TELEMETRY_LAKE_KEY, ANOMALY_MODELS_KEY],
    partitions_def=telemetry_partitions,
    required_resource_keys={"hot_store", "lake"},
    group_name="anomaly",
    kinds={"deltalake", "onnx"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10),
    description="Anomaly features and ONNX scores of every lake reading of one tenant-day (newest model of each "
    "device type, else the bundled one); Delta table {lake}/anomaly_scores, partition replaced whole. "
    "Scored rows are metered as ml_inference.",
)
def anomaly_scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Score one tenant-day of the lake and meter the rows scored."""
    tenant_id, day = parse_partition_key(context.partition_key)
    hot_store: HotStore = context.resources.hot_store
    lake: Lake = context.resources.lake
    settings = lake.settings()
    with hot_store.connect() as conn:
        device_types: dict[str, str | None] = dict(
            conn.execute("SELECT id, device_type FROM devices WHERE tenant_id = %s", (tenant_id,)).fetchall()
        )
        models = models_for(conn, sorted({t for t in device_types.values() if t}))
    result = write_scores(settings, tenant_id, day, device_types, models)
    # One flush id per run and partition: a retried step is not counted twice, a new run is (it scored again).
    flush_id = f"anomaly_scores:{context.run_id}:{tenant_id}:{day.isoformat()}"
    with hot_store.connect() as conn, conn.transaction():
        meter_inference(conn, flush_id, {(tenant_id, datetime.now(UTC).date()): result.scored})
    context.log.info(f"scored {result.scored} of {result.rows} readings of {tenant_id} {day}: {result.by_model}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "scored": result.scored,
            "models": dg.MetadataValue.json(result.by_model),
            "table_version": result.table_version,
            "uri": dg.MetadataValue.path(table_uri(settings, TABLE_NAME)),
        }
    )


def _complete(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    tenant_id, day = parse_partition_key(context.partition_key)
    settings = context.resources.lake.settings()
    scores = read_scores(settings, tenant_id, day)
    readings = lake_row_count(settings, tenant_id, day)
    keys = scores.select(["device_id", "metric", "ts"]).group_by(["device_id", "metric", "ts"]).aggregate([])
    values = scores["score"].drop_null().to_numpy()
    bad = int(np.count_nonzero(~(np.isfinite(values) & (values > 0) & (values <= 1))))
    problems = []
    if scores.num_rows != readings:
        problems.append(f"{scores.num_rows} score rows for {readings} lake readings")
    if keys.num_rows != scores.num_rows:
        problems.append(f"{scores.num_rows - keys.num_rows} duplicate keys")
    if bad:
        problems.append(f"{bad} scores not finite in (0, 1]")
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems) or f"{scores.num_rows} rows, one per reading, scores finite in (0, 1]",
        metadata={
            "rows": scores.num_rows,
            "lake_readings": readings,
            "scored": int(values.size),
            "unscored": int(pc.sum(pc.is_null(scores["score"])).as_py() or 0),
            "bad_scores": bad,
        },
    )


with warnings.catch_warnings():
    # Partitioned asset checks are a preview feature of Dagster 1.13 (docs/quality.md).
    warnings.simplefilter("ignore", dg.PreviewWarning)
    anomaly_scores_complete = dg.asset_check(
        asset=ANOMALY_SCORES_KEY,
        name=COMPLETE_CHECK_NAME,
        blocking=True,
        partitions_def=telemetry_partitions,
        required_resource_keys={"lake"},
        description="One score row per lake reading of the tenant-day, no key twice, every score finite in (0, 1].",
    )(_complete)
