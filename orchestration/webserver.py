"""The Dagster UI as a process and as a GraphQL peer: how the demo, tests and tools start it and ask it things.

`dagster dev` runs the webserver and the daemon (schedules, sensors, backfills, the run queue)
over one instance directory. The client speaks the webserver's GraphQL, the same documents the
UI sends, so what it sees (partitions, ticks, backfill status) is what a user sees.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

INSTANCE_CONFIG = Path(__file__).resolve().parent / "dagster.yaml"
LOCATION = "orchestration.definitions"
"""The code location `dagster dev -m orchestration.definitions` serves (named after the module)."""
REPOSITORY = "__repository__"
TELEMETRY_ASSET_PATHS = (["lake", "telemetry"], ["lake", "telemetry_1m"], ["lake", "telemetry_1h"])
"""What the UI selects for a telemetry backfill: the compaction and both rollups."""
TERMINAL_BACKFILL_STATES = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def prepare_dagster_home(dagster_home: Path) -> Path:
    """Create an instance directory with the repository's instance config (dagster.yaml); returns it."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copy(INSTANCE_CONFIG, dagster_home / "dagster.yaml")
    return dagster_home


def dagster_dev_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command that serves the UI and runs the daemon for orchestration.definitions (DAGSTER_HOME from env)."""
    return [sys.executable, "-m", "dagster", "dev", "-m", LOCATION, "-h", host, "-p", str(port)]


@contextmanager
def dagster_dev(
    env: Mapping[str, str],
    port: int,
    log: Path,
    cwd: Path,
    start_timeout_s: float = 180,
    stop_timeout_s: float = 30,
) -> Iterator[DagsterWebserver]:
    """`dagster dev` in its own process group with `env` (DAGSTER_HOME, SENSORMINE_*), logging to `log`.

    Yields a client once the webserver answers; stops the whole group (webserver, daemon, code
    servers, runs) on exit: SIGTERM, then SIGKILL after `stop_timeout_s`. Raises RuntimeError,
    with the log's end, when it does not come up.
    """
    proc = subprocess.Popen(
        dagster_dev_command(port),
        cwd=cwd,
        env=dict(env),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client = DagsterWebserver(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + start_timeout_s
        while not client.answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"dagster dev did not answer on port {port}; its log ({log}) ends:\n{tail}")
            time.sleep(0.5)
        yield client
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class DagsterGraphQLError(RuntimeError):
    """The webserver answered a GraphQL document with errors, or with an error union member."""


class DagsterWebserver:
    """A small client of the Dagster webserver's GraphQL API."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> DagsterWebserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answers(self) -> bool:
        """Whether the webserver is up (its /server_info answers)."""
        try:
            return self._http.get(f"{self.url}/server_info").status_code < 500
        except httpx.HTTPError:
            return False

    def query(self, document: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The `data` of one GraphQL request; raises DagsterGraphQLError on errors."""
        resp = self._http.post(f"{self.url}/graphql", json={"query": document, "variables": dict(variables or {})})
        resp.raise_for_status()
        body = resp.json()
        if body.get("errors"):
            raise DagsterGraphQLError("; ".join(e.get("message", str(e)) for e in body["errors"]))
        return body["data"]

    def partition_keys(self, asset_path: Sequence[str], dimension: str) -> list[str]:
        """The keys of one dimension of an asset's partitions, as the asset page lists them."""
        data = self.query(
            """query Keys($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) {
                 __typename ... on AssetNode { partitionKeysByDimension { name partitionKeys } } } }""",
            {"key": {"path": list(asset_path)}},
        )["assetNodeOrError"]
        if data["__typename"] != "AssetNode":
            raise DagsterGraphQLError(f"no asset {'/'.join(asset_path)}: {data['__typename']}")
        for dim in data["partitionKeysByDimension"]:
            if dim["name"] == dimension:
                return list(dim["partitionKeys"])
        raise DagsterGraphQLError(f"asset {'/'.join(asset_path)} has no partition dimension {dimension!r}")

    def launch_backfill(self, asset_paths: Sequence[Sequence[str]], partition_names: Sequence[str]) -> str:
        """Launch an asset backfill of these partitions as the UI's "Materialize" dialog does; returns its id."""
        result = self.query(
            """mutation Launch($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }""",
            {
                "params": {
                    "assetSelection": [{"path": list(p)} for p in asset_paths],
                    "partitionNames": list(partition_names),
                }
            },
        )["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise DagsterGraphQLError(f"backfill refused ({result['__typename']}): {result.get('message')}")
        return str(result["backfillId"])

    def backfill_status(self, backfill_id: str) -> str:
        """A backfill's BulkActionStatus (REQUESTED while it runs; see TERMINAL_BACKFILL_STATES)."""
        data = self.query(
            """query Backfill($id: String!) { partitionBackfillOrError(backfillId: $id) {
                 __typename ... on PartitionBackfill { status } ... on Error { message } } }""",
            {"id": backfill_id},
        )["partitionBackfillOrError"]
        if data["__typename"] != "PartitionBackfill":
            raise DagsterGraphQLError(f"no backfill {backfill_id}: {data.get('message', data['__typename'])}")
        return str(data["status"])

    def runs(self, tags: Mapping[str, str] | None = None, statuses: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Runs (newest first) carrying all of `tags`, optionally only in `statuses`: id, status, job, tags."""
        run_filter: dict[str, Any] = {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]}
        if statuses:
            run_filter["statuses"] = list(statuses)
        data = self.query(
            """query Runs($filter: RunsFilter) { runsOrError(filter: $filter) {
                 __typename ... on Runs { results { runId status jobName tags { key value } } } } }""",
            {"filter": run_filter},
        )["runsOrError"]
        if data["__typename"] != "Runs":
            raise DagsterGraphQLError(f"runs query failed: {data['__typename']}")
        return [{**r, "tags": {t["key"]: t["value"] for t in r["tags"]}} for r in data["results"]]

    def ticks(self, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        """Recent ticks of every sensor and schedule by name (newest first): status, skipReason, error."""
        tick_fields = "ticks(limit: $limit) { status skipReason error { message } }"
        data = self.query(
            f"""query Ticks($limit: Int) {{ repositoriesOrError {{ __typename ... on RepositoryConnection {{
                 nodes {{ name location {{ name }}
                   sensors {{ name sensorState {{ {tick_fields} }} }}
                   schedules {{ name scheduleState {{ {tick_fields} }} }} }} }} }} }}""",
            {"limit": limit},
        )["repositoriesOrError"]
        out: dict[str, list[dict[str, Any]]] = {}
        for repo in data.get("nodes", []):
            for sensor in repo["sensors"]:
                out[sensor["name"]] = sensor["sensorState"]["ticks"]
            for schedule in repo["schedules"]:
                out[schedule["name"]] = schedule["scheduleState"]["ticks"]
        return out
