"""How every daemon process runs: INFO logging, stop on SIGTERM/SIGINT, a progress line now and then."""

from __future__ import annotations

import functools
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, TypeVar

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
log = logging.getLogger("sensormine.daemon")


class Restartable(Protocol):
    """A daemon's one attempt: run until `stop` (or fail), then close."""

    def run(self, stop: threading.Event) -> object: ...

    def close(self) -> None: ...


D = TypeVar("D", bound=Restartable)


def stop_on_signals() -> threading.Event:
    """Set up INFO logging; returns an event that SIGTERM or SIGINT sets."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def run_restarting(
    stop: threading.Event,
    make: Callable[[], D],
    what: str,
    report: Callable[[D, str], None],
    max_backoff_s: float = 30.0,
) -> None:
    """Run `make()` until `stop`, starting over after any failure with doubling backoff (from 1 s).

    `report(daemon, prefix)` logs the daemon's counters: every 10 s while it runs, and once it stopped.
    Starting over must be safe at any point (each daemon says why it is: offsets with the rows, event ids).
    """
    backoff = 1.0
    while not stop.is_set():
        daemon: D | None = None
        attempt_over = threading.Event()  # ends this attempt's progress lines
        try:
            daemon = make()
            progress = functools.partial(report, daemon, "")
            threading.Thread(target=_report_while, args=(stop, attempt_over, progress), daemon=True).start()
            daemon.run(stop)
            backoff = 1.0
        except Exception as exc:
            log.error("%s failed (%s: %s); starting over in %.0f s", what, type(exc).__name__, exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff_s)
        finally:
            attempt_over.set()
            if daemon is not None:
                report(daemon, "stopped: ")
                try:
                    daemon.close()
                except Exception as exc:  # closing after a failure may fail the same way; the next attempt starts clean
                    log.warning("closing the failed %s: %s", what, exc)


def _report_while(stop: threading.Event, attempt_over: threading.Event, report: Callable[[], object]) -> None:
    while not attempt_over.wait(10.0) and not stop.is_set():
        report()


def report_until(stop: threading.Event, report: Callable[[], None], every_s: float = 10.0) -> None:
    """Call `report` every `every_s` seconds until `stop` is set."""
    while not stop.wait(every_s):
        report()


class CollectBetweenBatches:
    """Run Python's cycle collector between batches instead of whenever allocations pile up.

    A daemon that keeps a large, slowly changing state (the stream processor's windows and rule
    state: hundreds of thousands of objects) pays for every automatic full collection, which walks
    all of it: in `bench.streamproc` 42 full collections took 8 s of a 26 s run. Inside this
    context the automatic collector is off; reference counting still frees everything that is not
    in a cycle at once, `between_batches()` collects the young generations (cheap: only what the
    batch left alive) and, every `full_every_s`, the whole heap, so cyclic garbage is still freed.
    """

    def __init__(self, full_every_s: float = 60.0) -> None:
        self.full_every_s = full_every_s
        self._was_enabled = True
        self._full_at = time.monotonic()

    def __enter__(self) -> CollectBetweenBatches:
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._full_at = time.monotonic()
        return self

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self._was_enabled:
            gc.enable()

    def between_batches(self) -> None:
        """Collect the young generations; the whole heap when `full_every_s` has passed."""
        now = time.monotonic()
        if now - self._full_at >= self.full_every_s:
            gc.collect()
            self._full_at = now
        else:
            gc.collect(1)
