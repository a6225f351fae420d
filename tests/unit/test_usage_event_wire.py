"""Usage events without services: their wire form, what is refused, and the byte meter's retries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import pytest

from sensormine.metering.usage_events import (
    DATA_EGRESS,
    DATA_INGESTED,
    ByteMeter,
    UsageEvent,
    UsageEventError,
)

AT = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)


def test_an_event_survives_its_wire_form() -> None:
    e = UsageEvent("id-1", "acme", AT, DATA_INGESTED, 1234, "ingest:consumer", {"messages": "3"})
    doc = orjson.loads(e.to_json())
    assert doc["unit"] == "bytes" and doc["ts"] == "2026-12-05T10:30:00+00:00"
    assert UsageEvent.from_json(e.to_json()) == e


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "not JSON"),
        (b"[1]", "a JSON object"),
        (b'{"event_id": "x"}', "missing tenant_id, ts, resource, quantity, source"),
        (b'{"event_id": "x", "tenant_id": "a", "ts": "2026-12-05T00:00:00+00:00", "resource": "gold", '
         b'"quantity": 1, "source": "s"}', "unknown resource 'gold'"),
        (b'{"event_id": "x", "tenant_id": "a", "ts": "2026-12-05T00:00:00+00:00", "resource": "data_egress", '
         b'"quantity": 1, "unit": "GB", "source": "s"}', "unit 'GB'"),
        (b'{"event_id": "x", "tenant_id": "a", "ts": "2026-12-05T00:00:00+00:00", "resource": "data_egress", '
         b'"quantity": -1, "source": "s"}', "whole number"),
        (b'{"event_id": "x", "tenant_id": "a", "ts": "2026-12-05T00:00:00+00:00", "resource": "data_egress", '
         b'"quantity": 1.5, "source": "s"}', "whole number"),
        (b'{"event_id": "x", "tenant_id": "a", "ts": "2026-12-05T00:00:00", "resource": "data_egress", '
         b'"quantity": 1, "source": "s"}', "time zone"),
        (b'{"event_id": "x", "tenant_id": "a", "ts": "yesterday", "resource": "data_egress", '
         b'"quantity": 1, "source": "s"}', "not ISO-8601"),
        (b'{"event_id": "", "tenant_id": "a", "ts": "2026-12-05T00:00:00+00:00", "resource": "data_egress", '
         b'"quantity": 1, "source": "s"}', "needs an event_id"),
    ],
)  # fmt: skip
def test_malformed_events_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(UsageEventError, match=reason):
        UsageEvent.from_json(raw)


class FlakySink:
    """Refuses the first `failures` emits, then keeps what it is given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.kept: list[UsageEvent] = []
        self.closed = False

    def emit(self, events: Sequence[UsageEvent]) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("broker away")
        self.kept.extend(events)

    def close(self) -> None:
        self.closed = True


def test_a_failed_emit_is_retried_under_the_same_ids() -> None:
    sink = FlakySink(failures=1)
    meter = ByteMeter(DATA_EGRESS, "api", sink)
    meter.count("acme", 100)
    meter.count("acme", 20)
    meter.count("globex", 7)
    meter.count("globex", 0)  # nothing to count
    with pytest.raises(RuntimeError):
        meter.flush()
    assert meter.unflushed() == 127
    meter.count("acme", 3)  # counted after the failure: a new event, the failed ones keep their ids
    assert meter.flush() == 130
    assert sorted((e.tenant_id, e.quantity) for e in sink.kept) == [("acme", 3), ("acme", 120), ("globex", 7)]
    assert len({e.event_id for e in sink.kept}) == 3
    assert meter.unflushed() == 0 and meter.flush() == 0
    meter.close()
    assert sink.closed


def test_counts_of_an_earlier_day_keep_that_day() -> None:
    sink = FlakySink(failures=0)
    meter = ByteMeter(DATA_EGRESS, "api", sink)
    meter._counts[("acme", "2026-12-04")] = 50  # counted before midnight, emitted after
    meter.flush()
    assert sink.kept[0].ts == datetime(2026, 12, 4, 23, 59, 59, 999999, tzinfo=UTC)
