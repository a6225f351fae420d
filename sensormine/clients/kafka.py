"""Kafka client module: the only place that builds producer, consumer and admin configurations."""

from __future__ import annotations

import zlib
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from sensormine.settings import Settings, get_settings


class KafkaNotConfigured(RuntimeError):
    """Raised when Kafka is needed and SENSORMINE_KAFKA_BOOTSTRAP is unset."""


def _bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap:
        raise KafkaNotConfigured("SENSORMINE_KAFKA_BOOTSTRAP is not set: run `sensormine services up` first")
    return settings.kafka_bootstrap


def make_producer(settings: Settings | None = None, **overrides: Any) -> Producer:
    """An idempotent producer tuned for throughput (batched, lz4)."""
    settings = settings or get_settings()
    conf = {
        "bootstrap.servers": _bootstrap(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "message.timeout.ms": 30_000,
    }
    conf.update(overrides)
    return Producer(conf)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition librdkafka's default partitioner (`consistent_random`) gives a keyed message:
    the key's CRC-32 modulo the partition count."""
    return zlib.crc32(key) % partitions


def make_consumer(group_id: str, settings: Settings | None = None, **overrides: Any) -> Consumer:
    """A consumer whose offsets are managed by the caller (no auto-commit)."""
    settings = settings or get_settings()
    conf = {
        "bootstrap.servers": _bootstrap(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "fetch.min.bytes": 1,
        "fetch.wait.max.ms": 50,
        "max.partition.fetch.bytes": 8_388_608,
        "topic.metadata.refresh.interval.ms": 2_000,
        # A crashed member's partitions move to a live one after this, not after the 45 s default.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 2_000,
    }
    conf.update(overrides)
    return Consumer(conf)


def make_admin(settings: Settings | None = None) -> AdminClient:
    """An admin client."""
    settings = settings or get_settings()
    return AdminClient({"bootstrap.servers": _bootstrap(settings)})


def ensure_topics(names: list[str], partitions: int = 4, settings: Settings | None = None) -> None:
    """Create topics that do not exist yet (existing ones are left alone)."""
    admin = make_admin(settings)
    existing = set(admin.list_topics(timeout=10).topics)
    new = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names if n not in existing]
    if not new:
        return
    for name, fut in admin.create_topics(new).items():
        try:
            fut.result(timeout=30)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create Kafka topic {name}: {exc}") from exc
