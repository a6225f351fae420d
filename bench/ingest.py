"""Ingest benchmark: Kafka → HotStoreConsumer → PostgreSQL, against a raw COPY of the same rows.

Run with `uv run python -m bench.ingest [--readings 1000000]` after `sensormine services up`
(it reads SENSORMINE_DATABASE_URL and SENSORMINE_KAFKA_BOOTSTRAP). It creates its own database,
topic prefix and consumer groups, and removes them at the end.

The workload is produced once; then each trial empties the hot store and lets a fresh consumer
group read every message again, and the raw ceilings COPY the rows the consumer wrote, prebuilt
in memory, into an identical empty table:

- batch order (the like-for-like ceiling): the consumer's own batches of that trial, each sorted
  as the consumer sorts a batch (series by series in key order, day by day), COPYed one batch per
  transaction, in the same order and sizes;
- key order: all rows sorted by primary key, one COPY in one transaction (a bulk load into an
  empty index, out of reach of a stream);
- time order: all rows unsorted (as they arrive), one COPY in one transaction; kept for
  comparison with earlier figures, but NOT like for like: the consumer sorts each batch.

The phases are interleaved: each trial runs end to end, then every ceiling, in an order that
rotates from trial to trial. Figures are medians over the trials: the machine is shared.
No cache and no rollup is involved: every phase is the write path into PostgreSQL itself.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from bench.common import checkpoint, rate, say, scratch_database
from ingest_daemons.consumer import ConsumerStats, HotStoreConsumer, PreparedBatch
from sensormine.clients.hotstore import COLUMNS, CopyBatch, WriteResult, stored_offsets
from sensormine.clients.kafka import ensure_topics, make_admin
from sensormine.clients.postgres import existing_partition_days, partition_name
from sensormine.ingest.sinks import KafkaSink
from sensormine.reading import Reading, datetime_to_us
from sensormine.settings import Settings

METRICS = (
    "temperature", "pressure", "humidity", "vibration_rms", "motor_current",
    "line_voltage", "power_kw", "flow_rate", "spindle_rpm", "oil_temp",
)  # fmt: skip

# Row orders for the whole-table raw ceilings (one COPY, one transaction): as a live stream arrives
# (every device at each instant), and sorted by primary key (a bulk load into an empty table: the
# best case, out of reach of a stream).
RAW_ORDERS = {
    "time order": "ts, tenant_id, device_id, metric",
    "key order": "tenant_id, device_id, metric, ts",
}
# The like-for-like ceiling: the consumer's own batches, sorted as it sorts them, one transaction each.
BATCH_ORDER = "batch order"
CEILINGS = (BATCH_ORDER, *RAW_ORDERS)
CEILING_LABELS = {
    BATCH_ORDER: "batch order, 1 txn per batch",
    "key order": "key order, 1 txn",
    "time order": "time order, unsorted, 1 txn",
}


@dataclass(frozen=True)
class Workload:
    """What gets produced: `rounds` samples of every metric of every device, spread over `span_s`."""

    readings: int
    devices: int
    metrics: int
    tenants: int
    span_s: int
    partitions: int = 4  # Kafka partitions per topic

    @property
    def per_round(self) -> int:
        """Readings per sampling round (one message per device)."""
        return self.devices * self.metrics

    @property
    def rounds(self) -> int:
        """Sampling rounds needed to reach at least `readings`."""
        return math.ceil(self.readings / self.per_round)

    @property
    def total(self) -> int:
        """Readings actually produced (whole rounds)."""
        return self.rounds * self.per_round

    @property
    def messages(self) -> int:
        """Kafka messages produced: one per device per round."""
        return self.rounds * self.devices

    def tenant_ids(self) -> list[str]:
        """Tenant ids, one telemetry topic each."""
        return [f"bench-t{i}" for i in range(self.tenants)]

    def metric_names(self) -> list[str]:
        """Realistic metric names, padded with numbered ones when more are asked for."""
        return [METRICS[i] if i < len(METRICS) else f"metric_{i:03d}" for i in range(self.metrics)]


@dataclass
class Fingerprint:
    """Aggregates of a set of readings, to check that what landed is what was produced."""

    rows: int = 0
    value_sum: float = 0.0
    quality_sum: int = 0
    ts_min: int | None = None
    ts_max: int | None = None

    def add(self, readings: list[Reading]) -> None:
        """Account for one message's readings."""
        self.rows += len(readings)
        self.value_sum += math.fsum(r.value for r in readings)
        self.quality_sum += sum(r.quality for r in readings)
        lo, hi = min(r.ts for r in readings), max(r.ts for r in readings)
        self.ts_min = lo if self.ts_min is None else min(self.ts_min, lo)
        self.ts_max = hi if self.ts_max is None else max(self.ts_max, hi)

    def matches(self, other: Fingerprint) -> bool:
        """Equal, up to float rounding in the value sum."""
        return (self.rows, self.quality_sum, self.ts_min, self.ts_max) == (
            other.rows,
            other.quality_sum,
            other.ts_min,
            other.ts_max,
        ) and math.isclose(self.value_sum, other.value_sum, rel_tol=1e-9)


def table_fingerprint(conn: psycopg.Connection, table: str = "telemetry") -> Fingerprint:
    """The same aggregates, computed by PostgreSQL over a table."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), sum(value), sum(quality), "
            "(extract(epoch FROM min(ts)) * 1000000)::bigint, (extract(epoch FROM max(ts)) * 1000000)::bigint FROM {}"
        ).format(sql.Identifier(table))
    ).fetchone()
    assert row is not None
    rows, value_sum, quality_sum, ts_min, ts_max = row
    return Fingerprint(rows, value_sum or 0.0, quality_sum or 0, ts_min, ts_max)


def produce(workload: Workload, settings: Settings) -> tuple[float, Fingerprint]:
    """Produce the workload through the platform's KafkaSink; returns seconds taken and what was produced."""
    tenants = workload.tenant_ids()
    devices = [(tenants[d % len(tenants)], f"dev-{d:04d}") for d in range(workload.devices)]
    metrics = workload.metric_names()
    # The window ends a little before now (the consumer rejects readings from the future) and
    # spans one or two UTC midnights, so the writer fills several day partitions.
    end_us = datetime_to_us(datetime.now(UTC)) // 1_000_000 * 1_000_000 - 600_000_000
    start_us = end_us - workload.span_s * 1_000_000
    step_us = workload.span_s * 1_000_000 // workload.rounds
    sink = KafkaSink(settings)
    produced = Fingerprint()
    t0 = time.perf_counter()
    report_every = max(1, workload.rounds // 10)
    for r in range(workload.rounds):
        for d, (tenant, device) in enumerate(devices):
            ts = start_us + r * step_us + (d * 7_919) % 1_000 * 1_000  # devices do not sample in lockstep
            ingest_ts = ts + 150_000 + (r * d) % 50_000
            quality = 1 if (r * 31 + d) % 97 == 0 else 0
            points = [
                Reading(tenant, device, m, ts, round(20 + 5 * math.sin(r / 50 + d + j) + j * 10, 4), quality, ingest_ts)
                for j, m in enumerate(metrics)
            ]
            sink.publish(tenant, device, "bench", points)
            produced.add(points)
        if (r + 1) % report_every == 0:
            done = (r + 1) * workload.per_round
            say(f"produced {done:,} / {workload.total:,} readings ({rate(done, time.perf_counter() - t0):,.0f}/s)")
    pending = sink.flush(120)
    if pending or sink.delivery_errors:
        raise RuntimeError(f"Kafka delivery failed: {pending} pending, {sink.delivery_errors} errors")
    return time.perf_counter() - t0, produced


class RecordingConsumer(HotStoreConsumer):
    """The real consumer, keeping a reference to each batch it writes (the batch-order ceiling replays them).

    Only a list append per batch on top of the real `write`; the rows themselves are not copied.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.written: list[CopyBatch] = []

    def write(self, batch: PreparedBatch) -> WriteResult:
        result = super().write(batch)
        self.written.append(batch.rows)
        return result


def consume(
    workload: Workload, settings: Settings, timeout_s: float
) -> tuple[float, ConsumerStats, list[list[bytes]], list[int]]:
    """Run the real consumer until every produced message is committed.

    Returns first message → last commit, the stats, the binary COPY stream of every batch it
    wrote, in order (the rows sorted exactly as the consumer sent them), and each batch's rows.
    """
    url = settings.database_url
    assert url is not None
    consumer = RecordingConsumer(settings)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(stop)
        except BaseException as exc:  # surfaced in the main thread
            failure.append(exc)
            stop.set()

    thread = threading.Thread(target=run, name="bench-consumer")
    thread.start()
    t_start = last_report = time.monotonic()
    try:
        with psycopg.connect(url, autocommit=True) as probe:
            # Done means: the offsets committed with the rows cover every message produced.
            while not stop.is_set():
                committed = sum(stored_offsets(probe, settings.consumer_group).values())
                now = time.monotonic()
                if committed >= workload.messages:
                    break
                if now - last_report >= 2:
                    say(f"  {committed:,} / {workload.messages:,} messages committed")
                    last_report = now
                if now - t_start > timeout_s:
                    raise TimeoutError(f"consumer did not finish within {timeout_s:.0f} s")
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        consumer.close()
    if failure:
        raise RuntimeError("consumer failed") from failure[0]
    s = consumer.stats
    assert s.first_message_at is not None and s.last_commit_at is not None
    batches = [list(b.chunks()) for b in consumer.written]
    sizes = [b.rows for b in consumer.written]
    consumer.written.clear()
    return s.last_commit_at - s.first_message_at, s, batches, sizes


def consume_unmetered(
    workload: Workload, settings: Settings, url: str, produced: Fingerprint, timeout_s: float
) -> float:
    """One end-to-end run without ingest metering on an emptied hot store, left empty; returns its seconds."""
    say("  end to end, metering off ...")
    reset_hot_store(url)
    checkpoint(url)
    seconds, _, _, _ = consume(workload, settings, timeout_s)
    with psycopg.connect(url) as conn:
        if not table_fingerprint(conn).matches(produced):
            raise RuntimeError("the hot store does not hold exactly the produced readings (metering off)")
    if metered_bytes(url) != (0, 0):
        raise RuntimeError("metering off still metered")
    say(f"  end to end, metering off: {rate(workload.total, seconds):,.0f} readings/s")
    reset_hot_store(url)
    return seconds


def reset_hot_store(url: str) -> None:
    """Empty the hot store, its offsets and the usage it metered, keeping the day partitions, for the next run."""
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE telemetry, ingest_offsets, usage_events, usage")


def metered_bytes(url: str) -> tuple[int, int]:
    """(bytes in the usage events, bytes in the ledger) of data_ingested: equal when metering worked."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT coalesce(sum(quantity), 0) FROM usage_events WHERE resource = 'data_ingested'), "
            "(SELECT coalesce(sum(value), 0) FROM usage WHERE metric = 'data_ingested')"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def dump_rows(url: str, order: str) -> list[bytes]:
    """PostgreSQL's own binary COPY output of the written rows in one of RAW_ORDERS (nothing of our encoder)."""
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    dump = sql.SQL("COPY (SELECT {} FROM telemetry ORDER BY {}) TO STDOUT (FORMAT BINARY)")
    with psycopg.connect(url) as conn, conn.cursor().copy(dump.format(cols, sql.SQL(RAW_ORDERS[order]))) as cp:
        return [bytes(chunk) for chunk in cp]


def raw_copy(url: str, streams: list[list[bytes]], expected: Fingerprint) -> float:
    """COPY prebuilt rows into a new table identical to `telemetry` (columns, primary key, day partitions).

    Each stream (a whole binary COPY: header, rows, trailer) is one COPY in its own transaction,
    committed before the next starts. Returns the seconds from the first COPY to the last commit.
    """
    cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE telemetry_raw (LIKE telemetry INCLUDING ALL) PARTITION BY RANGE (ts)")
        for day in sorted(existing_partition_days(conn)):
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF telemetry_raw FOR VALUES FROM ({}) TO ({})").format(
                    sql.Identifier(partition_name(day).replace("telemetry", "telemetry_raw")),
                    sql.Literal(f"{day.isoformat()} 00:00:00+00"),
                    sql.Literal(f"{(day + timedelta(days=1)).isoformat()} 00:00:00+00"),
                )
            )
        conn.commit()
        checkpoint(url)
        copy_sql = sql.SQL("COPY telemetry_raw ({}) FROM STDIN (FORMAT BINARY)").format(cols)
        t0 = time.perf_counter()
        for chunks in streams:
            with conn.transaction(), conn.cursor().copy(copy_sql) as cp:
                for chunk in chunks:
                    cp.write(chunk)
        elapsed = time.perf_counter() - t0
        if not table_fingerprint(conn, "telemetry_raw").matches(expected):
            raise RuntimeError("the raw COPY did not write the produced rows")
        conn.execute("DROP TABLE telemetry_raw")
        conn.commit()
    return elapsed


@dataclass
class Results:
    """Seconds per trial, per phase."""

    produce_s: float = 0.0
    e2e_s: list[float] = field(default_factory=list)
    unmetered_s: list[float] = field(default_factory=list)  # the same end to end with SENSORMINE_METER_INGEST off
    raw_s: dict[str, list[float]] = field(default_factory=lambda: {order: [] for order in CEILINGS})
    stats: ConsumerStats | None = None
    batch_rows: list[int] = field(default_factory=list)  # rows per batch, last trial


def report(workload: Workload, results: Results, batch_size: int) -> str:
    """The figures as a table: median readings/s over the trials, with the range."""
    total = workload.total

    def median_rate(seconds: list[float]) -> float:
        return rate(total, statistics.median(seconds))

    def row(label: str, seconds: list[float]) -> str:
        rates = sorted(rate(total, s) for s in seconds)
        spread = f"{rates[0]:,.0f} - {rates[-1]:,.0f}" if len(rates) > 1 else ""
        return f"{label:<56}{statistics.median(seconds):>9.2f}{median_rate(seconds):>13,.0f}{spread:>22}"

    def ratio(label: str, value: float) -> str:
        return f"{label:<56}{'':>9}{value:>13.2f}"

    e2e = median_rate(results.e2e_s)
    raw = {order: median_rate(s) for order, s in results.raw_s.items()}
    # Ratios of the same trial (end to end and its ceilings ran back to back), then their median.
    paired = {
        order: statistics.median(rate(r, e) for e, r in zip(results.e2e_s, s, strict=True))
        for order, s in results.raw_s.items()
    }
    metering_cost = statistics.median(1 - u / e for e, u in zip(results.e2e_s, results.unmetered_s, strict=True))
    s = results.stats
    sizes = sorted(results.batch_rows)
    width = 100
    lines = [
        f"Ingest benchmark, {os.cpu_count()} cores: {total:,} readings in {workload.messages:,} Kafka messages "
        f"({workload.devices} devices x {workload.metrics} metrics per message, {workload.tenants} tenants, "
        f"{workload.span_s / 3600:g} h of timestamps); median of {len(results.e2e_s)} trials, phases interleaved",
        "measured: the write path into PostgreSQL (no cache, no rollup involved)",
        "",
        f"{'phase':<56}{'seconds':>9}{'readings/s':>13}{'range (readings/s)':>22}",
        "-" * width,
        row("produce to Kafka (setup, not compared)", [results.produce_s]),
        row("end to end: Kafka -> consumer -> PostgreSQL", results.e2e_s),
        row("end to end, ingest metering off (SENSORMINE_METER_INGEST)", results.unmetered_s),
        *(row(f"raw ceiling: COPY, {CEILING_LABELS[order]}", results.raw_s[order]) for order in CEILINGS),
        "-" * width,
        ratio("ratio end to end / batch order (like for like)", rate(e2e, raw[BATCH_ORDER])),
        ratio("ratio end to end / key order (bulk-load bound)", rate(e2e, raw["key order"])),
        ratio("ratio end to end / time order (not like for like)", rate(e2e, raw["time order"])),
        "same ratios, median of per-trial ratios: " + ", ".join(f"{o} {paired[o]:.2f}" for o in CEILINGS),
        f"metering cost on the ingest path (1 - metered / unmetered, median of per-trial pairs): "
        f"{metering_cost:.1%} (target <= 5 %)",
        "",
        f"consumer (last trial): {s.batches} batches of up to {batch_size:,} messages "
        f"({sizes[0]:,} - {sizes[-1]:,} readings each), {s.readings:,} readings, "
        f"{s.inserted:,} inserted, {s.duplicates} duplicates, {s.rejected} rejected"
        if s and sizes
        else "",
    ]
    return "\n".join(lines)


def cleanup_kafka(settings: Settings, workload: Workload, groups: list[str]) -> None:
    """Delete the benchmark's topics and consumer groups."""
    admin = make_admin(settings)
    existing = set(admin.list_topics(timeout=10).topics)
    wanted = [settings.telemetry_topic(t) for t in workload.tenant_ids()] + [settings.dlq_topic]
    topics = [t for t in wanted if t in existing]
    if topics:
        for fut in admin.delete_topics(topics, operation_timeout=30).values():
            fut.result(30)
    if groups:
        for fut in admin.delete_consumer_groups(groups, request_timeout=30).values():
            try:
                fut.result(30)
            except Exception as exc:  # a group that never committed to Kafka has nothing to clean
                say(f"consumer group cleanup: {exc}")


def run(
    workload: Workload, base_url: str, bootstrap: str, trials: int, batch_size: int | None, timeout_s: float
) -> str:
    """Produce once, then `trials` times (consume end to end, raw COPY in each order); returns the report."""
    env = f"bench{uuid.uuid4().hex[:8]}"
    results = Results()
    groups: list[str] = []
    with scratch_database(base_url) as url:
        base = Settings(env=env, database_url=url, kafka_bootstrap=bootstrap)
        if batch_size:
            base = base.model_copy(update={"consumer_batch_size": batch_size})
        say(f"database {url.rsplit('/', 1)[1]}, topic prefix {env}")
        try:
            ensure_topics([base.telemetry_topic(t) for t in workload.tenant_ids()], workload.partitions, base)
            results.produce_s, produced = produce(workload, base)
            dumps: dict[str, list[list[bytes]]] = {}
            for trial in range(1, trials + 1):
                if trial > 1:
                    reset_hot_store(url)
                checkpoint(url)
                # A new group each trial: nothing stored for it, so it reads every message from the start.
                settings = base.model_copy(update={"consumer_group": f"{env}-hot-writer-{trial}"})
                groups.append(settings.consumer_group)
                # The same run with ingest metering off, before or after the metered one (alternating).
                unmetered = settings.model_copy(
                    update={"consumer_group": f"{env}-unmetered-{trial}", "meter_ingest": False}
                )
                groups.append(unmetered.consumer_group)
                if trial % 2 == 0:
                    results.unmetered_s.append(consume_unmetered(workload, unmetered, url, produced, timeout_s))
                say(f"trial {trial}/{trials}: end to end ...")
                seconds, results.stats, batches, results.batch_rows = consume(workload, settings, timeout_s)
                with psycopg.connect(url) as conn:
                    if not table_fingerprint(conn).matches(produced):
                        raise RuntimeError("the hot store does not hold exactly the produced readings")
                events, ledger = metered_bytes(url)
                if not events or events != ledger:
                    raise RuntimeError(f"ingest metering went wrong: {events} bytes in events, {ledger} in the ledger")
                results.e2e_s.append(seconds)
                say(f"trial {trial}/{trials}: {events:,} payload bytes metered")
                say(
                    f"trial {trial}/{trials}: end to end {rate(workload.total, seconds):,.0f} readings/s "
                    f"in {len(batches)} batches"
                )
                if not dumps:  # PostgreSQL's own COPY output of the rows, once (the same rows every trial)
                    dumps = {order: [dump_rows(url, order)] for order in RAW_ORDERS}
                streams = {BATCH_ORDER: batches, **dumps}
                # Rotate the ceilings' order from trial to trial, so none always runs first or last.
                for order in CEILINGS[trial % len(CEILINGS) :] + CEILINGS[: trial % len(CEILINGS)]:
                    seconds = raw_copy(url, streams[order], produced)
                    results.raw_s[order].append(seconds)
                    say(f"trial {trial}/{trials}: raw COPY, {order}: {rate(workload.total, seconds):,.0f} readings/s")
                del batches, streams
                if trial % 2 == 1:
                    reset_hot_store(url)
                    checkpoint(url)
                    results.unmetered_s.append(consume_unmetered(workload, unmetered, url, produced, timeout_s))
            del dumps
        finally:
            cleanup_kafka(base, workload, groups)
    return report(workload, results, base.consumer_batch_size)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table; everything it created is removed."""
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1_000_000, help="readings to produce (whole rounds)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--metrics", type=int, default=10, help="metrics per device = readings per message")
    parser.add_argument("--tenants", type=int, default=4, help="tenants, one topic each")
    parser.add_argument("--partitions", type=int, default=4, help="Kafka partitions per topic")
    parser.add_argument("--span-hours", type=float, default=36, help="time span the timestamps cover")
    parser.add_argument("--trials", type=int, default=3, help="end-to-end and raw runs; medians are reported")
    parser.add_argument("--batch-size", type=int, default=None, help="override SENSORMINE_CONSUMER_BATCH_SIZE")
    parser.add_argument("--timeout", type=float, default=600, help="give up when one consumer run takes longer (s)")
    args = parser.parse_args(argv)

    base_url = os.environ.get("SENSORMINE_DATABASE_URL")
    bootstrap = os.environ.get("SENSORMINE_KAFKA_BOOTSTRAP")
    if not base_url or not bootstrap:
        raise SystemExit("set SENSORMINE_DATABASE_URL and SENSORMINE_KAFKA_BOOTSTRAP: source .sensormine/services.env")
    workload = Workload(
        args.readings, args.devices, args.metrics, args.tenants, int(args.span_hours * 3600), args.partitions
    )
    print(run(workload, base_url, bootstrap, args.trials, args.batch_size, args.timeout), flush=True)


if __name__ == "__main__":
    main()
