"""Checks the consumer applies to every message before it reaches the hot store."""

from __future__ import annotations

from collections.abc import Sequence

from sensormine.reading import Reading, now_us
from sensormine.settings import Settings


def future_limit_us(settings: Settings, now: int | None = None) -> int:
    """The latest timestamp a reading may carry: now plus the allowed clock skew, in epoch microseconds."""
    return (now if now is not None else now_us()) + settings.max_future_skew_s * 1_000_000


def validate_message(readings: Sequence[Reading], settings: Settings, now: int | None = None) -> str | None:
    """Why a normalised message must be rejected, or None when it may be written.

    A message is accepted or rejected whole, so its readings stay together in the DLQ.
    The consumer's fast path (`payload.decode_envelope_into`) applies the same limit and defers here to explain.
    """
    if not readings:
        return "message has no readings"
    limit = future_limit_us(settings, now)
    for i, r in enumerate(readings):
        if r.ts > limit:
            return f"timestamp more than {settings.max_future_skew_s} s in the future (at /points/{i})"
    return None
