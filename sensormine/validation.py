"""Checks the consumer applies to every message before it reaches the hot store."""

from __future__ import annotations

from collections.abc import Sequence

from sensormine.reading import Reading, now_us
from sensormine.settings import Settings


def validate_message(readings: Sequence[Reading], settings: Settings, now: int | None = None) -> str | None:
    """Why a normalised message must be rejected, or None when it may be written.

    A message is accepted or rejected whole, so its readings stay together in the DLQ.
    """
    if not readings:
        return "message has no readings"
    limit = (now if now is not None else now_us()) + settings.max_future_skew_s * 1_000_000
    for i, r in enumerate(readings):
        if r.ts > limit:
            return f"timestamp more than {settings.max_future_skew_s} s in the future (at /points/{i})"
    return None
