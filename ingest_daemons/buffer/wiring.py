"""How the daemons get their buffered sink: Kafka (reporting failures to the buffer) or the direct path,
behind a `BufferedSink` whose file and knobs come from the settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message

from ingest_daemons.buffer.journal import DropPolicy
from ingest_daemons.buffer.sink import (
    DEFAULT_DELIVERY_TIMEOUT_S,
    DEFAULT_LINK_TIMEOUT_S,
    DEFAULT_MAX_BYTES,
    BufferedSink,
)
from sensormine.alerts.processor import watched_sink
from sensormine.ingest.sinks import Done, KafkaSink, ReadingSink
from sensormine.settings import Settings, get_settings

log = logging.getLogger("sensormine.ingest.buffer")


class _ReportingKafkaSink(KafkaSink):
    """A KafkaSink that tells its `done` ticket when a delivery failed (`done.failed(reason)`), so the
    buffer learns of it exactly instead of waiting for a backstop timeout."""

    def _delivery_callback(self, done: Done | None) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                if done is not None:
                    done()
                return
            self.delivery_errors += 1
            failed = getattr(done, "failed", None)
            if failed is not None:
                failed(f"Kafka: {err.str()}")
            else:
                log.error("Kafka delivery to %s failed: %s", msg.topic(), err)

        return on_delivery


def _setting(settings: Settings, name: str, default: Any) -> Any:
    """A buffer setting from Settings when it has the field, else the default."""
    value = getattr(settings, name, None)
    return default if value is None else value


def buffer_path(settings: Settings, name: str) -> Path:
    """Where the buffer of the daemon called `name` lives: `{buffer_dir or state_dir/buffers}/{name}.sqlite3`."""
    folder = _setting(settings, "buffer_dir", None) or Path(settings.state_dir) / "buffers"
    return Path(folder) / f"{name}.sqlite3"


def make_buffered_sink(
    settings: Settings | None = None,
    name: str = "ingest",
    *,
    path: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    drop: DropPolicy | None = None,
    link_timeout_s: float | None = None,
    retry_s: float | None = None,
) -> BufferedSink:
    """The daemons' sink: Kafka when SENSORMINE_KAFKA_BOOTSTRAP is set, else the in-process hot-store path,
    behind a store-and-forward buffer named after the daemon (`name`, e.g. its MQTT client id).

    Arguments override the settings `buffer_dir`, `buffer_max_bytes`, `buffer_drop`,
    `buffer_link_timeout_s` and `buffer_retry_s` (defaults apply while Settings lacks them).
    """
    settings = settings or get_settings()
    max_bytes = max_bytes or _setting(settings, "buffer_max_bytes", DEFAULT_MAX_BYTES)
    drop = drop or _setting(settings, "buffer_drop", "oldest")
    link_timeout_s = link_timeout_s or _setting(settings, "buffer_link_timeout_s", DEFAULT_LINK_TIMEOUT_S)
    retry_s = retry_s or _setting(settings, "buffer_retry_s", 1.0)
    path = path or buffer_path(settings, name)
    assert link_timeout_s is not None
    inner: ReadingSink
    holder: list[BufferedSink] = []  # the Kafka error callback needs the sink built below
    if settings.kafka_bootstrap:
        from sensormine.clients.kafka import make_producer

        def on_error(err: KafkaError) -> None:
            if err.fatal():
                log.critical("Kafka producer failed fatally (%s): restart the daemon", err.str())
            if err.code() == KafkaError._ALL_BROKERS_DOWN and holder:
                holder[0].link_down(f"Kafka: {err.str()}")

        link_ms = round(link_timeout_s * 1000)
        request_ms = max(link_ms, 10_000)
        producer = make_producer(
            settings,
            **{
                # An unreachable broker fails a message after link_timeout_s, which sends it to the buffer.
                "message.timeout.ms": link_ms,
                "request.timeout.ms": request_ms,
                "socket.timeout.ms": request_ms,
                "reconnect.backoff.max.ms": 1_000,  # notice a returning broker within a second
                "error_cb": on_error,
            },
        )
        inner = _ReportingKafkaSink(settings, producer)
        # Backstop above anything librdkafka may take to report (message, request and socket timeouts).
        backstop = link_timeout_s + 2 * request_ms / 1000 + 10
    else:
        inner = watched_sink(settings)  # in-process: the alarm rules evaluate what it stores
        backstop = DEFAULT_DELIVERY_TIMEOUT_S  # DirectSink is synchronous: it never leaves a message pending
    sink = BufferedSink(inner, path, max_bytes=max_bytes, drop=drop, delivery_timeout_s=backstop, retry_s=retry_s)
    holder.append(sink)
    return sink
