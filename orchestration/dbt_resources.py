"""The dbt side of the Definitions: the `dbt` resource, a job and a daily schedule for the dbt models.

Also a command line wrapper that runs dbt with the lake of the current SENSORMINE_* settings:

    uv run python -m orchestration.dbt_resources build        # any dbt arguments; default `build`
"""

import os
import subprocess
import sys
from collections.abc import Sequence
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource
from packaging.version import Version

from assets.dbt import (
    DBT_PROJECT_DIR,
    dbt_database_path,
    dbt_environment,
    dbt_executable,
    sensormine_dbt_models,
)
from lake.storage import open_table
from lake.telemetry import TABLE_NAME as TELEMETRY_TABLE
from orchestration.resources import LakeResource
from sensormine.settings import get_settings

# An hour after telemetry_lake_daily_close_schedule (00:30 UTC) starts closing off the previous day.
DBT_DAILY_CRON = "30 1 * * *"


class SensormineDbtCliResource(DbtCliResource):
    """DbtCliResource that knows the version of this environment's own dbt without asking it.

    DbtCliResource learns the dbt version by running `dbt --version` once per resource instance,
    i.e. once per Dagster run: a second dbt start-up (seconds here) that also looks up the latest
    release on PyPI. When the executable is this environment's dbt, the installed dbt-core
    package says the same thing; any other executable (dbt Fusion, another venv) is still asked.
    """

    @cached_property
    def _cli_version(self) -> Version:
        """The dbt version, from package metadata when the executable is this environment's dbt."""
        if Path(self.dbt_executable).resolve() == Path(dbt_executable()).resolve():
            return Version(version("dbt-core"))
        return DbtCliResource._cli_version.func(self)  # type: ignore[attr-defined]


def build_dbt_resource() -> DbtCliResource:
    """The `dbt` resource: the project in dbt/, its own profiles.yml, the environment's dbt executable.

    Where the lake and the DuckDB file are comes from the `lake` resource at run time (see
    assets.dbt.dbt_environment), so this resource is the same in every environment.
    """
    return SensormineDbtCliResource(
        project_dir=os.fspath(DBT_PROJECT_DIR),
        profiles_dir=os.fspath(DBT_PROJECT_DIR),
        dbt_executable=dbt_executable(),
    )


dbt_models_job = dg.define_asset_job(
    "dbt_models_job",
    selection=dg.AssetSelection.assets(sensormine_dbt_models),
    description="`dbt build` of the dbt models over the lake (group dbt), with their tests as asset checks.",
)


@dg.schedule(
    name="dbt_models_daily_schedule",
    job=dbt_models_job,
    cron_schedule=DBT_DAILY_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every day at 01:30 UTC, after the previous day's closing compaction, rebuild the dbt models "
    "(skipped while the lake has no telemetry table).",
)
def dbt_models_daily_schedule(
    context: dg.ScheduleEvaluationContext, lake: LakeResource
) -> dg.RunRequest | dg.SkipReason:
    """One `dbt build` a day, once the lake holds a telemetry table to read (else dbt would fail)."""
    if open_table(lake.settings(), TELEMETRY_TABLE) is None:
        return dg.SkipReason(f"no telemetry table under {lake.root} yet: nothing has been compacted")
    tick = context.scheduled_execution_time
    return dg.RunRequest(run_key=tick.isoformat() if tick else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run dbt in dbt/ with the lake and DuckDB file of the current settings; returns dbt's exit code."""
    args = list(sys.argv[1:] if argv is None else argv) or ["build"]
    settings = get_settings()
    dbt_database_path(settings).parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DBT_PROFILES_DIR": os.fspath(DBT_PROJECT_DIR), **dbt_environment(settings)}
    return subprocess.call([dbt_executable(), *args], cwd=DBT_PROJECT_DIR, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
