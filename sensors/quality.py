"""Sensor reacting to failed blocking data-quality checks on the lake's telemetry partitions.

* A failed `hot_lake_parity` check requests one re-compaction of that partition (a run of
  `telemetry_lake_job`, which re-runs the checks too). The run is tagged with the run whose check
  failed; if the parity check fails again in such a run, the sensor logs that a person is needed
  and requests nothing more, so it can never loop.
* A failed suite check (nulls, out-of-day rows, out-of-range values, duplicates) is logged: a
  re-compaction would copy the same hot-store rows again, so there is nothing to retry.

The cursor is the id of the last check execution handled. A failure is only acted on while it is
still the partition's latest parity result, so turning the sensor on late does not re-compact
partitions that have passed since.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

# The execution history of asset checks has no public accessor on DagsterInstance in 1.13;
# the event log storage's is the one the UI uses.
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.storage.asset_check_execution_record import (
    AssetCheckExecutionRecord,
    AssetCheckExecutionRecordStatus,
)

from assets.quality import BLOCKING_CHECK_KEYS, PARITY_CHECK_NAME
from assets.telemetry import TELEMETRY_LAKE_KEY

PARITY_CHECK_KEY = dg.AssetCheckKey(TELEMETRY_LAKE_KEY, PARITY_CHECK_NAME)
TELEMETRY_LAKE_JOB = "telemetry_lake_job"
"""The job that compacts a telemetry partition and runs its checks (orchestration/definitions.py)."""
RECOMPACTION_TAG = "sensormine/recompaction_of"
"""Tag of a re-compaction run requested by this sensor: the id of the run whose parity check failed."""
_PAGE = 100


@dataclass(frozen=True)
class FailedCheck:
    """One failed evaluation of a blocking check on a telemetry partition."""

    id: int
    check_name: str
    partition: str | None
    run_id: str
    description: str | None


def failed_checks_since(
    instance: dg.DagsterInstance, check_keys: Iterable[dg.AssetCheckKey], after_id: int
) -> list[FailedCheck]:
    """Failed (not errored) evaluations of the checks with an execution id above `after_id`, oldest first."""
    found: list[FailedCheck] = []
    for key in check_keys:
        before: int | None = None
        while True:
            # Newest first, `cursor` pages towards older executions.
            page = instance.event_log_storage.get_asset_check_execution_history(
                key, limit=_PAGE, cursor=before, status={AssetCheckExecutionRecordStatus.FAILED}
            )
            fresh = [r for r in page if r.id > after_id]
            found.extend(_failed(r) for r in fresh)
            if len(page) < _PAGE or len(fresh) < len(page):
                break
            before = page[-1].id
    return sorted(found, key=lambda f: f.id)


def _failed(record: AssetCheckExecutionRecord) -> FailedCheck:
    evaluation = record.event.dagster_event.event_specific_data if record.event and record.event.dagster_event else None
    description = getattr(evaluation, "description", None)
    return FailedCheck(record.id, record.key.name, record.partition, record.run_id, description)


def _is_latest(instance: dg.DagsterInstance, failure: FailedCheck) -> bool:
    """Whether `failure` is still the newest execution (planned, running or done) of its check on its partition."""
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [PARITY_CHECK_KEY], partition_filter=PartitionKeyFilter(key=failure.partition)
    ).get(PARITY_CHECK_KEY)
    return latest is None or latest.id == failure.id


def _parse_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        return int(cursor)
    except ValueError:
        raise ValueError(f"quality check sensor cursor must be an execution id, got {cursor!r}") from None


@dg.sensor(
    name="failed_quality_checks_sensor",
    job_name=TELEMETRY_LAKE_JOB,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="On a failed hot_lake_parity check, requests one re-compaction of that telemetry partition "
    "(never a second for the same failure chain); logs failed data-quality suite checks.",
)
def failed_quality_checks_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Turn new failed blocking checks into (at most one per failure chain) re-compaction run requests."""
    after = _parse_cursor(context.cursor)
    failures = failed_checks_since(context.instance, BLOCKING_CHECK_KEYS, after)
    cursor = str(max([after, *(f.id for f in failures)]))
    requests: list[dg.RunRequest] = []
    requested: set[str] = set()
    for failure in failures:
        where = f"{failure.check_name} failed on partition {failure.partition} in run {failure.run_id}"
        if failure.check_name != PARITY_CHECK_NAME:
            context.log.warning(f"{where}: {failure.description or 'no description'} (re-compaction would not fix it)")
            continue
        if failure.partition is None or failure.partition in requested:
            continue
        if not _is_latest(context.instance, failure):
            context.log.info(f"{where}: superseded by a later evaluation, nothing to do")
            continue
        run = context.instance.get_run_by_id(failure.run_id)
        if run is not None and RECOMPACTION_TAG in run.tags:
            context.log.error(
                f"{where}, itself a re-compaction of run {run.tags[RECOMPACTION_TAG]}: still failing, "
                "not retrying again. Investigate the partition (failing_rows on the check shows the differing keys)."
            )
            continue
        context.log.info(f"{where}: {failure.description or ''}; requesting one re-compaction")
        requested.add(failure.partition)
        requests.append(
            dg.RunRequest(
                run_key=f"recompact:{failure.partition}:{failure.run_id}",
                partition_key=failure.partition,
                tags={RECOMPACTION_TAG: failure.run_id},
            )
        )
    if not requests:
        reason = f"{len(failures)} new failed check(s), no re-compaction to request"
        return dg.SensorResult(skip_reason=reason, cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
