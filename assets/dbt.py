"""dbt models over the lake (the dbt-duckdb project in `dbt/`), loaded as Dagster assets by dagster-dbt.

Each model is an asset keyed `dbt/<model>` in group "dbt"; the `lake.telemetry` source maps onto
the existing `lake/telemetry` asset, so the lineage graph runs from the hot store through the
Delta table to the marts, and every dbt test is an asset check. One run executes `dbt build`
(models and tests in dependency order) with the lake of the `lake` resource.

The manifest Dagster needs to build the asset graph is generated on import when it is missing
or stale (`ensure_manifest`), so a clean clone (CI) loads the Definitions without a build step.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets
from filelock import FileLock

from assets.telemetry import Lake
from sensormine.settings import Settings

DBT_PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt"
DBT_GROUP = "dbt"
DBT_KEY_PREFIX = "dbt"
# Concurrency pool of the dbt step: DuckDB allows one writing process per database file, so a
# limit of 1 on this pool (dagster.yaml `concurrency: pools:`) queues overlapping runs.
DBT_POOL = "sensormine_dbt"
# Files of the project that are build output or installed packages, never inputs of a parse.
_NOT_SOURCES = {"target", "logs", "dbt_packages"}
# Dagster's manifest has a folder of its own: `dbt build` run by hand rewrites target/manifest.json
# in place, which a process loading the Definitions at that moment could read half-written.
MANIFEST_DIR = Path("target", "dagster")
_HASH_FILE = "manifest.sha256"
# dbt artefacts of the latest runs kept under {state_dir}/dbt-target (one folder per invocation).
_KEEP_RUN_TARGETS = 20


class ManifestError(RuntimeError):
    """`dbt parse` failed, so no manifest (and no dbt assets) can be loaded."""


def dbt_executable() -> str:
    """The `dbt` command of this interpreter's environment (even when its bin/ is not on PATH)."""
    beside = Path(sys.executable).with_name("dbt")
    if beside.exists():
        return str(beside)
    return shutil.which("dbt") or "dbt"


def project_fingerprint(project_dir: Path) -> str:
    """SHA-256 over the project's source files (paths and contents) and the dbt versions."""
    digest = hashlib.sha256()
    digest.update(f"dbt-core {version('dbt-core')} dbt-duckdb {version('dbt-duckdb')}\n".encode())
    for path in sorted(project_dir.rglob("*")):
        rel = path.relative_to(project_dir)
        if not path.is_file() or rel.parts[0] in _NOT_SOURCES or any(p.startswith(".") for p in rel.parts):
            continue
        digest.update(f"{rel.as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def manifest_is_current(target: Path, fingerprint: str) -> bool:
    """Whether `target` holds a manifest parsed from project files with this fingerprint."""
    hash_file = target / _HASH_FILE
    return (
        (target / "manifest.json").is_file()
        and hash_file.is_file()
        and hash_file.read_text(encoding="utf-8").strip() == fingerprint
    )


def ensure_manifest(project_dir: Path = DBT_PROJECT_DIR, timeout_s: float = 300) -> Path:
    """`{project_dir}/target/dagster/manifest.json`, regenerated with `dbt parse` when missing or stale.

    Stale means the project's files (or the dbt versions) differ from those of the last parse,
    recorded as a fingerprint beside the manifest; a current manifest costs one hash of the
    project's few files. Concurrent processes (the code server and run workers all import the
    Definitions) serialise on a file lock, and the manifest is parsed into a private folder and
    moved into place, so no process ever reads a half-written one.
    """
    target = project_dir / MANIFEST_DIR
    fingerprint = project_fingerprint(project_dir)
    if manifest_is_current(target, fingerprint):
        return target / "manifest.json"
    target.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target / "manifest.lock"), timeout=timeout_s):
        if manifest_is_current(target, fingerprint):
            return target / "manifest.json"
        scratch = target / f"parse-{uuid.uuid4().hex[:8]}"
        try:
            proc = subprocess.run(
                [dbt_executable(), "parse", "--quiet", "--target-path", str(scratch), "--log-path", str(scratch)],
                cwd=project_dir,
                env={**os.environ, "DBT_PROFILES_DIR": str(project_dir), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"},
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
            if proc.returncode != 0 or not (scratch / "manifest.json").is_file():
                raise ManifestError(
                    f"`dbt parse` of {project_dir} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                )
            os.replace(scratch / "manifest.json", target / "manifest.json")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        (target / _HASH_FILE).write_text(fingerprint + "\n", encoding="utf-8")
    return target / "manifest.json"


def dbt_database_path(settings: Settings) -> Path:
    """The DuckDB file holding the models' tables: `{state_dir}/dbt.duckdb`."""
    return settings.state_dir.resolve() / "dbt.duckdb"


def dbt_run_targets(settings: Settings) -> Path:
    """Where Dagster's dbt invocations leave their artefacts and logs: `{state_dir}/dbt-target`."""
    return settings.state_dir.resolve() / "dbt-target"


def prune_run_targets(folder: Path, keep: int = _KEEP_RUN_TARGETS) -> None:
    """Delete all but the `keep` newest invocation folders (their events are in Dagster already)."""
    if not folder.is_dir():
        return
    runs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in runs[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def dbt_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that point a dbt process at the lake and database of `settings`.

    The project reads SENSORMINE_LAKE_URI, SENSORMINE_STATE_DIR and SENSORMINE_DBT_DATABASE
    (profiles.yml, models/staging/_sources.yml). S3 options go in as the AWS_* variables that
    delta-rs reads from the environment, so credentials never appear in a dbt file, the manifest
    or dbt's logs.
    """
    env = {
        "SENSORMINE_LAKE_URI": settings.lake_root,
        "SENSORMINE_STATE_DIR": str(settings.state_dir.resolve()),
        "SENSORMINE_DBT_DATABASE": str(dbt_database_path(settings)),
    }
    # Settings.storage_options() uses object_store's own key names (AWS_REGION, AWS_ENDPOINT_URL,
    # aws_conditional_put ...), whose upper-case forms are the variables it reads.
    env.update({key.upper(): value for key, value in settings.storage_options().items()})
    return env


_ENVIRON_LOCK = threading.Lock()


@contextmanager
def dbt_process_environment(settings: Settings, extra: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Within the block, os.environ carries `dbt_environment(settings)` and `extra`; restored afterwards.

    DbtCliResource passes the process environment to the dbt subprocess it starts in `cli()`
    and has no parameter for extra variables, so start the invocation inside this block (the
    subprocess keeps its copy) and stream its events after it. A lock keeps two threads of one
    process from interleaving their changes.
    """
    env = {**dbt_environment(settings), **(extra or {})}
    with _ENVIRON_LOCK:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


class SensormineDbtTranslator(DagsterDbtTranslator):
    """dbt nodes as Sensormine assets: models keyed `dbt/<name>` in group "dbt".

    Sources keep dagster-dbt's default, which honours `meta.dagster.asset_key`: the lake's
    telemetry source is the `lake/telemetry` asset.
    """

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        """`dbt/<name>` for models (and seeds, snapshots); the declared key for sources."""
        if dbt_resource_props["resource_type"] == "source":
            return super().get_asset_key(dbt_resource_props)
        return super().get_asset_key(dbt_resource_props).with_prefix(DBT_KEY_PREFIX)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        """Every dbt model in group "dbt"."""
        return DBT_GROUP


dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR, target_path=MANIFEST_DIR)
DBT_MANIFEST_PATH = ensure_manifest(DBT_PROJECT_DIR)


@dbt_assets(
    manifest=DBT_MANIFEST_PATH,
    project=dbt_project,
    name="sensormine_dbt_models",
    dagster_dbt_translator=SensormineDbtTranslator(),
    required_resource_keys={"dbt", "lake"},
    pool=DBT_POOL,
)
def sensormine_dbt_models(context: dg.AssetExecutionContext) -> Iterator[Any]:
    """`dbt build` of the selected models and their tests over the `lake` resource's lake."""
    dbt: DbtCliResource = context.resources.dbt
    lake: Lake = context.resources.lake
    settings = lake.settings()
    # DuckDB creates the database file but not its folder.
    dbt_database_path(settings).parent.mkdir(parents=True, exist_ok=True)
    # DbtCliResource puts each invocation's artefacts in a fresh folder under DBT_TARGET_PATH:
    # the state directory, not the repository's dbt/ folder.
    targets = dbt_run_targets(settings)
    with dbt_process_environment(settings, {"DBT_TARGET_PATH": str(targets)}):
        invocation = dbt.cli(["build"], context=context)
    yield from invocation.stream()
    prune_run_targets(targets)
