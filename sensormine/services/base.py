"""Common shape of a launchable service: start, wait until it answers, stop, export settings."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sensormine.services import process, system
from sensormine.services.errors import ServiceError
from sensormine.services.system import Requirement

Progress = Callable[[str], None]

EMBEDDED_HINT = (
    "Or run `sensormine services up --embedded` to use the pip-wheel PostgreSQL (pgserver) "
    "and MQTT broker (amqtt) instead of Debian's postgresql and mosquitto."
)

__all__ = ["Progress", "Record", "Service", "ServiceError"]


@dataclass
class Record:
    """What `up` remembers about one running service (stored in services.json)."""

    name: str
    pid: int
    port: int
    url: str
    log: str
    mode: str = "system"  # "system" (Debian/Maven binaries) or "embedded" (pip wheels)
    start_time: int | None = None  # /proc start time; guards against pid reuse
    started_at: float = field(default_factory=time.time)
    ports: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain-dict form for services.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """Inverse of `to_json`, ignoring unknown keys from other versions."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Service(ABC):
    """One server process under `<state>/services/<name>/`."""

    name: ClassVar[str]
    ready_timeout: ClassVar[float] = 60.0
    stop_grace: ClassVar[float] = 15.0
    has_embedded: ClassVar[bool] = False  # True if `--embedded` swaps in a pip-wheel server

    def __init__(self, state_root: Path, *, embedded: bool = False) -> None:
        self.state_root = state_root
        self.embedded = embedded
        self.dir = state_root / "services" / self.name
        if self.drops_privileges() and system.is_root() and not system.others_can_reach(state_root):
            # The unprivileged server user could not reach a private state dir: keep its files
            # in a folder it can reach, derived from the state dir so every command finds it.
            self.dir = system.private_state_fallback(state_root) / self.name

    # -- to implement -------------------------------------------------------------
    @abstractmethod
    def requirements(self) -> list[Requirement]:
        """Executables this service needs before `start` (installed together by `up`)."""

    @abstractmethod
    def start(self, previous: Record | None, progress: Progress) -> Record:
        """Spawn the server (do not wait for it); reuse `previous` ports when free."""

    @abstractmethod
    def probe(self, rec: Record) -> bool:
        """Speak the service's protocol once; True if it answered."""

    @abstractmethod
    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_* settings for clients of this service."""

    # -- overridable --------------------------------------------------------------
    def drops_privileges(self) -> bool:
        """True when the server runs as an unprivileged user although the launcher is root."""
        return False

    def after_ready(self, rec: Record, progress: Progress) -> None:  # noqa: B027 - optional hook
        """One-off setup once the server answers (e.g. create a database)."""

    def stop(self, rec: Record) -> None:
        """Stop the server: SIGTERM its process group, SIGKILL after a grace period."""
        process.terminate(rec.pid, rec.start_time, self.stop_grace)

    # -- shared -------------------------------------------------------------------
    def answers(self, rec: Record) -> bool:
        """Cheap check that the port is served (override where a bare TCP connect is noisy)."""
        return process.port_open(rec.port)

    def is_running(self, rec: Record) -> bool:
        """The recorded process exists (same start time, so not a recycled pid) and its port answers."""
        if not process.pid_alive(rec.pid, rec.start_time):
            return False
        try:
            return self.answers(rec)
        except OSError:
            return False

    def launch(self, previous: Record | None, progress: Progress) -> Record:
        """Start, wait until the service answers, run one-off setup; stop it again on failure."""
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        rec = self.start(previous, progress)
        try:
            self.wait_ready(rec)
            self.after_ready(rec, progress)
        except BaseException:
            self.stop(rec)
            raise
        progress(f"{self.name}: ready at {rec.url} (pid {rec.pid}, {time.monotonic() - t0:.1f} s)")
        return rec

    def wait_ready(self, rec: Record) -> None:
        """Poll `probe` until it succeeds; fail fast if the process dies, with the log tail."""
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.05
        while True:
            if not process.pid_alive(rec.pid, rec.start_time):
                raise self.failure(rec, "exited during start-up")
            try:
                if self.probe(rec):
                    return
            except Exception:  # any client error just means "not yet"
                pass
            if time.monotonic() > deadline:
                raise self.failure(rec, f"did not answer within {self.ready_timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def failure(self, rec: Record, what: str) -> ServiceError:
        """A ServiceError naming the service, its log tail and the next step."""
        tail = process.log_tail(Path(rec.log)) or "(log is empty)"
        return ServiceError(
            f"{self.name} {what} (pid {rec.pid}, port {rec.port}).\n"
            f"Last lines of {rec.log}:\n{tail}\n"
            f"Next: read the full log, fix the cause (port clash, disk, permissions), then run "
            f"`sensormine services down --only {self.name}` and `sensormine services up --only {self.name}`; "
            f"delete {self.dir} to start {self.name} from scratch."
        )

    def record(self, proc_pid: int, port: int, url: str, log: Path, **kw: Any) -> Record:
        """Build a Record for a freshly spawned process."""
        return Record(
            name=self.name,
            pid=proc_pid,
            port=port,
            url=url,
            log=str(log),
            mode="embedded" if self.embedded and self.has_embedded else "system",
            start_time=process.proc_start_time(proc_pid),
            **kw,
        )
