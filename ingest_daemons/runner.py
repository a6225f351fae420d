"""How every daemon process runs: INFO logging, stop on SIGTERM/SIGINT, a progress line now and then."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def stop_on_signals() -> threading.Event:
    """Set up INFO logging; returns an event that SIGTERM or SIGINT sets."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def report_until(stop: threading.Event, report: Callable[[], None], every_s: float = 10.0) -> None:
    """Call `report` every `every_s` seconds until `stop` is set."""
    while not stop.wait(every_s):
        report()
