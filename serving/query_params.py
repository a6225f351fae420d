"""Query parameters of the REST API: bucket widths (5m, PT5M), aggregate and fill names."""

from __future__ import annotations

import re
from collections.abc import Sequence

from query.aggregate import AGGS, DAY_US, FILLS, US, QueryError

_UNITS_US = {"ms": 1_000, "s": US, "m": 60 * US, "min": 60 * US, "h": 3_600 * US, "d": DAY_US, "w": 7 * DAY_US}


_SHORT = re.compile(r"^\s*(\d+)\s*(ms|s|min|m|h|d|w)\s*$", re.IGNORECASE)


_ISO = re.compile(
    r"^P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d{1,6})?)S)?)?$",
    re.IGNORECASE,
)


def parse_bucket(text: str) -> int:
    """A bucket width in microseconds from `30s`, `15m`, `1h`, `1d`, `2w`, `500ms` or ISO-8601 `PT5M`, `P1D`."""
    width = 0
    short = _SHORT.match(text)
    iso = None if short else _ISO.match(text.strip())
    if short:
        width = int(short[1]) * _UNITS_US[short[2].lower()]
    elif iso and any(iso.groupdict().values()):
        parts = {k: v or "0" for k, v in iso.groupdict().items()}
        seconds_us = round(float(parts["s"]) * US)
        width = (
            int(parts["w"]) * 7 * DAY_US
            + int(parts["d"]) * DAY_US
            + int(parts["h"]) * 3_600 * US
            + int(parts["m"]) * 60 * US
            + seconds_us
        )
    else:
        raise QueryError(
            f"bucket {text!r} is not a duration: use a number and a unit (500ms, 30s, 15m, 1h, 1d, 1w) "
            "or an ISO-8601 duration such as PT5M or P1D (months and years have no fixed width)"
        )
    if width <= 0 or width % 1_000:
        raise QueryError(f"bucket {text!r} must be a positive whole number of milliseconds")
    return width


def iso_duration(width_us: int) -> str:
    """ISO-8601 text of a width: PT1M, PT1H30M, P1D, PT0.5S."""
    days, rest = divmod(width_us, DAY_US)
    hours, rest = divmod(rest, 3_600 * US)
    minutes, rest = divmod(rest, 60 * US)
    seconds = rest / US
    out = "P" + (f"{days}D" if days else "")
    time_part = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if rest:
        time_part += f"{int(seconds)}S" if rest % US == 0 else f"{seconds:g}S"
    return out + ("T" + time_part if time_part else "") if (days or time_part) else "PT0S"


def check_aggs(aggs: Sequence[str] | None) -> tuple[str, ...]:
    """The requested aggregates in request order, without repeats (avg when none)."""
    out = tuple(dict.fromkeys(a.strip().lower() for a in (aggs or ["avg"]) for a in a.split(",") if a.strip()))
    unknown = [a for a in out if a not in AGGS]
    if unknown:
        raise QueryError(f"unknown aggregate {', '.join(unknown)}: choose from {', '.join(AGGS)}")
    return out or ("avg",)


def check_fill(fill: str | None) -> str:
    """The gap-filling mode (none when absent)."""
    mode = (fill or "none").strip().lower()
    if mode not in FILLS:
        raise QueryError(f"unknown fill {fill!r}: choose from {', '.join(FILLS)}")
    return mode
