"""Calendar arithmetic of metering and quotas (UTC months)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def month_start(now: datetime) -> datetime:
    """Midnight UTC on the first of `now`'s month."""
    now = now.astimezone(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def next_month_start(now: datetime) -> datetime:
    """Midnight UTC on the first of the month after `now`'s."""
    start = month_start(now)
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def seconds_until_next_month(now: datetime) -> int:
    """Whole seconds (rounded up, at least 1) until the next month starts, UTC."""
    return max(1, math.ceil((next_month_start(now) - now).total_seconds()))


def month_label(now: datetime) -> str:
    """`YYYY-MM` of `now`, UTC."""
    return f"{now.astimezone(UTC):%Y-%m}"
