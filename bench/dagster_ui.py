"""Screenshots of the Dagster UI as a user meets it (not a benchmark): checks, sensors, schedules.

Run with `uv run python -m bench.dagster_ui [--out docs/ui]` after `sensormine services up`
(it reads SENSORMINE_DATABASE_URL) on a machine with Debian's `chromium`. It creates its own
database, lake and Dagster instance, seeds two tenants (one reading of acme's boiler out of its
schema's range every 50), starts `dagster dev` with today's compaction every minute, launches a
backfill of yesterday through the webserver's GraphQL (the UI's own mutation), waits for the
schedule's first run, then drives headless Chromium (Playwright) through the pages and writes:

- automation.png: every sensor and schedule, running;
- sensor_ticks.png: tenant_partitions_sensor's tick history (under the daemon);
- schedule_ticks.png: telemetry_lake_hourly_schedule's ticks and the runs each launched;
- check_history.png: values_in_schema_range's executions per partition;
- check_failing_rows.png: the failed execution's metadata with its failing-row sample.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import psycopg

from bench.common import say, scratch_database
from orchestration.webserver import (
    LOCATION,
    TELEMETRY_ASSET_PATHS,
    TERMINAL_BACKFILL_STATES,
    dagster_dev,
    prepare_dagster_home,
)
from sensormine.clients.hotstore import HotStoreWriter
from sensormine.clients.postgres import ensure_partition_window
from sensormine.devices.registry import create_device
from sensormine.reading import Reading, datetime_to_us
from sensormine.schemas.store import register_schema
from sensormine.settings import Settings
from sensormine.tenancy.tenants import create_tenant

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Chromium flags for a closed network (background requests would fail, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BOILER_SCHEMA = {
    "type": "object",
    "properties": {
        "ts": {},
        "values": {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -40, "maximum": 90}}},
    },
}
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _series(tenant_id: str, device_id: str, day: date, n: int, hot_every: int = 0) -> list[Reading]:
    """n temperatures a minute apart from the day's midnight; every `hot_every`-th one far above range."""
    start = datetime_to_us(datetime(day.year, day.month, day.day, tzinfo=UTC))
    return [
        Reading(
            tenant_id,
            device_id,
            "temperature",
            start + i * 60_000_000,
            60.0 + i % 7 + (50.0 if hot_every and i % hot_every == 3 else 0.0),
            0,
            start,
        )
        for i in range(n)
    ]


def seed(url: str, settings: Settings, today: date) -> None:
    """acme (a boiler with a schema; some readings out of range yesterday) and globex (clean data)."""
    yesterday = today - timedelta(days=1)
    with psycopg.connect(url) as conn:
        ensure_partition_window(conn, today, settings)
        for tenant_id in ("acme", "globex"):
            create_tenant(conn, tenant_id, tenant_id.capitalize(), plan="pro")
            create_device(conn, tenant_id, "boiler-1", device_type="boiler")
            register_schema(conn, tenant_id, "boiler", BOILER_SCHEMA)
        writer = HotStoreWriter(conn)
        writer.write(_series("acme", "boiler-1", yesterday, 600, hot_every=50) + _series("acme", "boiler-1", today, 60))
        writer.write(_series("globex", "boiler-1", yesterday, 600) + _series("globex", "boiler-1", today, 60))
        conn.commit()


def _wait(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = probe()
        if answer:
            return answer
        time.sleep(1)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def shoot(base_url: str, out: Path) -> list[Path]:
    """Visit the pages in headless Chromium and write the screenshots; returns their paths."""
    from playwright.sync_api import sync_playwright

    location = f"{base_url}/locations/{LOCATION}"
    written: list[Path] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})

        def snap(name: str, url: str | None = None, wait_for: str | None = None) -> None:
            if url:
                page.goto(url)
            if wait_for:
                page.get_by_text(wait_for).first.wait_for(timeout=30_000)
            page.wait_for_timeout(2_000)  # let the remaining queries of the page settle before the picture
            skip = page.get_by_role("button", name="Skip")  # Dagster's one-time community dialog
            if skip.is_visible():
                skip.click()
            path = out / f"{name}.png"
            page.screenshot(path=str(path))
            written.append(path)
            say(f"wrote {path}")

        snap("automation", f"{base_url}/automation", wait_for="tenant_partitions_sensor")
        snap("sensor_ticks", f"{location}/sensors/tenant_partitions_sensor", wait_for="Latest tick")
        snap("schedule_ticks", f"{location}/schedules/telemetry_lake_hourly_schedule", wait_for="runs requested")
        page.goto(f"{base_url}/assets/lake/telemetry?view=checks&checkDetail=values_in_schema_range")
        page.get_by_text("Execution history").click()
        snap("check_history", wait_for="unexpected row")
        page.locator("tr", has_text="Failed").first.locator("button").last.click()
        snap("check_failing_rows", wait_for="failing_rows_shown")
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    """Seed, run Dagster, take the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ui", help="where the PNG files go")
    args = parser.parse_args(argv)
    base_url = os.environ.get("SENSORMINE_DATABASE_URL")
    if not base_url:
        raise SystemExit("SENSORMINE_DATABASE_URL is not set: run `sensormine services up` and eval its exports")
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sensormine-ui-"))
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    try:
        with scratch_database(base_url, "ui") as url:
            settings = Settings(database_url=url, state_dir=work, lake_uri=str(work / "lake"))
            seed(url, settings, today)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SENSORMINE_")}
            env.update(
                {
                    "DAGSTER_HOME": str(prepare_dagster_home(work / "dagster")),
                    "SENSORMINE_DATABASE_URL": url,
                    "SENSORMINE_STATE_DIR": str(work),
                    "SENSORMINE_LAKE_URI": settings.lake_root,
                    "SENSORMINE_LAKE_COMPACTION_CRON": "* * * * *",
                }
            )
            say("starting dagster dev ...")
            with dagster_dev(env, _free_port(), work / "dagster.log", REPO) as ui:
                _wait(lambda: len(ui.partition_keys(["lake", "telemetry"], "tenant")) == 2, 180, "tenant partitions")
                say("tenants are partitions; launching a backfill of yesterday for both")
                backfill = ui.launch_backfill(TELEMETRY_ASSET_PATHS, [f"{yesterday}|acme", f"{yesterday}|globex"])
                status = _wait(
                    lambda: (s := ui.backfill_status(backfill)) in TERMINAL_BACKFILL_STATES and s, 600, "the backfill"
                )
                say(f"backfill {backfill}: {status} (acme's range check is meant to fail)")
                _wait(
                    lambda: ui.runs({"dagster/schedule_name": "telemetry_lake_hourly_schedule"}, ["SUCCESS"]),
                    300,
                    "a scheduled run",
                )
                shoot(ui.url, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
