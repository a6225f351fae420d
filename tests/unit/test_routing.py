"""Topic parsing, Kafka topic naming and hot-store partition routing."""

from __future__ import annotations

import re
from datetime import date

from sensormine.clients.mqtt import parse_telemetry_topic, telemetry_topic
from sensormine.clients.postgres import epoch_day_to_date, partition_name
from sensormine.reading import US_PER_DAY, Reading, day_of
from sensormine.settings import Settings
from sensormine.telemetry.validation import validate_message


def test_mqtt_topic_round_trip() -> None:
    assert parse_telemetry_topic(telemetry_topic("acme", "press-1")) == ("acme", "press-1")
    for bad in (
        "sensormine/acme/telemetry",
        "sensormine/acme/p/x/telemetry",
        "other/acme/p/telemetry",
        "sensormine//p/telemetry",
    ):
        assert parse_telemetry_topic(bad) is None


def test_kafka_topics() -> None:
    s = Settings(env="prod")
    assert s.telemetry_topic("acme") == "prod.acme.telemetry"
    assert s.dlq_topic == "prod.dlq"
    pattern = re.compile(s.telemetry_topic_pattern)
    assert pattern.match("prod.acme.telemetry")
    assert not pattern.match("prod.dlq")
    assert not pattern.match("dev.acme.telemetry")


def test_partition_routing_by_utc_day() -> None:
    day = date(2026, 11, 26)
    first_us = (day - date(1970, 1, 1)).days * US_PER_DAY
    assert epoch_day_to_date(day_of(first_us)) == day
    assert epoch_day_to_date(day_of(first_us - 1)) == date(2026, 11, 25)
    assert epoch_day_to_date(day_of(first_us + US_PER_DAY - 1)) == day
    assert partition_name(day) == "telemetry_p20261126"


def test_future_timestamps_are_rejected() -> None:
    s = Settings(max_future_skew_s=60)
    now = 1_795_687_200_000_000
    ok = [Reading("a", "d", "m", now + 59_000_000, 1.0)]
    late = [Reading("a", "d", "m", now, 1.0), Reading("a", "d", "m", now + 61_000_000, 1.0)]
    assert validate_message(ok, s, now) is None
    assert "future" in (validate_message(late, s, now) or "")
    assert validate_message([], s, now) == "message has no readings"
