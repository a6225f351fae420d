"""Alarm latency: MQTT publish → alarm row in PostgreSQL → e-mail in the SMTP server's Maildir, on the in-process path.

Run with `uv run python -m bench.alert_latency [--samples 200]` after `sensormine services up` (PostgreSQL,
Mosquitto and the SMTP sink; it reads SENSORMINE_DATABASE_URL, SENSORMINE_MQTT_URL, SENSORMINE_SMTP_URL and
SENSORMINE_SMTP_MAILDIR). It uses its own database and an e-mail address of its own, and drops the
database at the end.

The path is the one users run without Kafka: `ingest_daemons.mqtt.MqttDaemon(settings)` with its
default sink (store-and-forward buffer → in-process DirectSink → hot store, the alarm processor
evaluating every stored batch, the notification dispatcher's worker thread sending e-mail through
SENSORMINE_SMTP_URL). One device, one rule (`temperature > 90`, hysteresis 5, e-mail to one
recipient). Each sample publishes, at QoS 1 as the tools client, one payload crossing the threshold
(then, as the next sample, one clearing it) and polls every millisecond until (1) the alarm row is
raised (or cleared) in PostgreSQL and (2) the e-mail of that event is a file in the Maildir's new/
folder (aiosmtpd's sink writes to tmp/ and renames, so a file seen is a whole message). Samples
run one after another, after a few warm-up ones; the clock starts just before `publish`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path

import orjson
import psycopg

from bench.common import database_url_for, loadavg, say, scratch_database
from ingest_daemons.mqtt import MqttDaemon
from sensormine.alerts import usecases
from sensormine.clients.mqtt import make_client, telemetry_topic
from sensormine.devices.registry import create_device
from sensormine.identity.credentials import operator_identity
from sensormine.settings import Settings, get_settings
from sensormine.tenancy.tenants import create_tenant

TENANT, DEVICE = "alat", "press-1"
LIMIT, HIGH, NORMAL = 90.0, 97.5, 20.0
TARGET_P99_S = 2.0
POLL_S = 0.001


@dataclass
class Samples:
    """Seconds from publish, per state of the alarm."""

    row: dict[str, list[float]] = field(default_factory=lambda: {"raised": [], "cleared": []})
    mail: dict[str, list[float]] = field(default_factory=lambda: {"raised": [], "cleared": []})


class Inbox:
    """New messages for one recipient in a Maildir's new/ folder (files seen before are skipped)."""

    def __init__(self, maildir: str, recipient: str) -> None:
        self.new = Path(maildir) / "new"
        self.recipient = recipient
        self.seen = set(os.listdir(self.new)) if self.new.exists() else set()

    def arrived(self) -> list[str]:
        """X-Sensormine-Event of each message for the recipient that appeared since the last call."""
        fresh = set(os.listdir(self.new)) - self.seen if self.new.exists() else set()
        events = []
        for name in sorted(fresh):
            self.seen.add(name)
            with open(self.new / name, "rb") as f:
                headers = BytesHeaderParser().parse(f)
            if self.recipient in (headers["X-RcptTo"] or ""):
                events.append(str(headers["X-Sensormine-Event"]))
        return events


def one_sample(
    client: object, conn: psycopg.Connection, inbox: Inbox, state: str, ts_s: int, timeout_s: float
) -> tuple[float, float]:
    """Publish one payload that raises (or clears) the alarm; seconds to the alarm row and to the e-mail."""
    status = "active" if state == "raised" else "cleared"
    value = HIGH if state == "raised" else NORMAL
    before = conn.execute("SELECT count(*) FROM alarms WHERE status = %s", (status,)).fetchone()
    want = (before[0] if before else 0) + 1  # a new active alarm; or the open one cleared
    at = datetime.fromtimestamp(ts_s, UTC).isoformat()
    body = orjson.dumps({"ts": at, "values": {"temperature": value}})
    row_at = mail_at = None
    t0 = time.perf_counter()
    client.publish(telemetry_topic(TENANT, DEVICE), body, qos=1)  # type: ignore[attr-defined]
    while row_at is None or mail_at is None:
        if row_at is None:
            got = conn.execute("SELECT count(*) FROM alarms WHERE status = %s", (status,)).fetchone()
            if got and got[0] >= want:
                row_at = time.perf_counter() - t0
        if mail_at is None:
            events = inbox.arrived()
            if events:
                if events != [f"alarm.{state}"]:
                    raise RuntimeError(f"expected the alarm.{state} e-mail, got {events}")
                mail_at = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{state}: row after {row_at} s, e-mail after {mail_at} s, waited {timeout_s:.0f} s")
        time.sleep(POLL_S)
    return row_at, mail_at


def run(base: Settings, maildir: str, samples: int, warmup: int, timeout_s: float) -> Samples:
    """Set up a tenant, a device and a rule in a scratch database, run the daemon, take the samples."""
    out = Samples()
    recipient = f"bench-{uuid.uuid4().hex[:8]}@alat.example"
    with scratch_database(base.database_url or "", prefix="bench_alat") as url:
        owner = os.environ.get("SENSORMINE_DATABASE_MIGRATE_URL")
        env = f"alat{uuid.uuid4().hex[:6]}"
        settings = base.model_copy(
            update={
                "env": env,
                "database_url": url,
                "database_migrate_url": database_url_for(owner, url.rsplit("/", 1)[1]) if owner else None,
                "kafka_bootstrap": None,  # the in-process path
            }
        )
        say(f"database {url.rsplit('/', 1)[1]}, recipient {recipient}")
        with psycopg.connect(url) as conn:
            create_tenant(conn, TENANT, plan="enterprise")
            create_device(conn, TENANT, DEVICE, device_type="press", at_broker=False)
            usecases.create_rule(
                conn,
                operator_identity(conn),
                TENANT,
                "overheat",
                {
                    "name": "Press overheating",
                    "severity": "critical",
                    "condition": {
                        "kind": "threshold",
                        "metric": "temperature",
                        "op": "gt",
                        "value": LIMIT,
                        "hysteresis": 5,
                    },
                    "notify": {"emails": [recipient]},
                },
            )
        say("starting the MQTT daemon (in-process sink, alarm processor, e-mail dispatcher) ...")
        daemon = MqttDaemon(settings).start()
        client = make_client("bench-alert-latency", settings)
        client.loop_start()
        inbox = Inbox(maildir, recipient)
        ts_s = int(time.time()) - 3_600
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                total = warmup + samples
                last_report = time.monotonic()
                for i in range(total):
                    state = "raised" if i % 2 == 0 else "cleared"
                    ts_s += 1
                    row_s, mail_s = one_sample(client, conn, inbox, state, ts_s, timeout_s)
                    if i >= warmup:
                        out.row[state].append(row_s)
                        out.mail[state].append(mail_s)
                    if time.monotonic() - last_report >= 2 or i == total - 1:
                        last = f"row {row_s * 1000:.1f} ms, e-mail {mail_s * 1000:.1f} ms"
                        say(f"  {i + 1} / {total} samples (last: {last})")
                        last_report = time.monotonic()
        finally:
            client.loop_stop()
            client.disconnect()
            daemon.stop()
    return out


def report(results: Samples, load: list[str]) -> str:
    """p50 / p95 / p99 / max per step and state, and the verdict against the target."""

    def cells(xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=100, method="inclusive")
        return "".join(f"{v * 1000:>10.1f}" for v in (q[49], q[94], q[98], max(xs))) + f"{len(xs):>9}"

    mail_all = results.mail["raised"] + results.mail["cleared"]
    row_all = results.row["raised"] + results.row["cleared"]
    p99 = statistics.quantiles(mail_all, n=100, method="inclusive")[98]
    width = 100
    lines = [
        f"Alarm latency on the in-process path (MqttDaemon, no Kafka), {os.cpu_count()} cores, one sample at a time",
        "measured: MQTT publish (QoS 1) -> hot store -> rule evaluation -> alarm row -> dispatcher -> SMTP -> Maildir",
        f"load average (1, 5, 15 min) at start / end: {load[0]} / {load[-1]}",
        "",
        f"{'publish ->':<51}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}{'samples':>9}",
        "-" * width,
        f"{'alarm row in PostgreSQL, raised':<51}{cells(results.row['raised'])}",
        f"{'alarm row in PostgreSQL, cleared':<51}{cells(results.row['cleared'])}",
        f"{'alarm row in PostgreSQL, both':<51}{cells(row_all)}",
        f"{'e-mail file in the Maildir, raised':<51}{cells(results.mail['raised'])}",
        f"{'e-mail file in the Maildir, cleared':<51}{cells(results.mail['cleared'])}",
        f"{'e-mail file in the Maildir, both':<51}{cells(mail_all)}",
        "-" * width,
        f"target p99 publish -> e-mail delivered < {TARGET_P99_S:g} s: {p99 * 1000:.1f} ms -> "
        f"{'met' if p99 < TARGET_P99_S else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, take the samples, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.alert_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="publishes timed, alternately raising and clearing")
    parser.add_argument("--warmup", type=int, default=6, help="untimed publishes first")
    parser.add_argument("--timeout", type=float, default=30, help="give up when one sample takes longer (s)")
    args = parser.parse_args(argv)
    settings = get_settings()
    maildir = os.environ.get("SENSORMINE_SMTP_MAILDIR")
    if not (settings.database_url and settings.mqtt_url and settings.smtp_url and maildir):
        raise SystemExit("start the services first: `make services-up`, then `source .sensormine/services.env`")
    load = [loadavg()]
    say(f"{args.samples} samples after {args.warmup} warm-up ones; load average {load[0]}")
    results = run(settings, maildir, args.samples + args.samples % 2, args.warmup + args.warmup % 2, args.timeout)
    load.append(loadavg())
    print(report(results, load), flush=True)


if __name__ == "__main__":
    main()
