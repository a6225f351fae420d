"""Start, stop and inspect the local services; state lives in `<state>/services/services.json`."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensormine.services import system
from sensormine.services.base import Progress, Record, Service
from sensormine.services.errors import ServiceError
from sensormine.services.kafka import Kafka
from sensormine.services.mosquitto import Mosquitto
from sensormine.services.postgres import Postgres
from sensormine.services.process import pid_alive
from sensormine.services.redis import Redis
from sensormine.services.s3 import S3
from sensormine.services.smtp import Smtp
from sensormine.services.stripe_mock import StripeMock

ALL_SERVICES = ("postgres", "mosquitto", "redis", "kafka", "s3", "smtp", "stripe")

_CLASSES: dict[str, type[Service]] = {
    "postgres": Postgres,
    "mosquitto": Mosquitto,
    "redis": Redis,
    "kafka": Kafka,
    "s3": S3,
    "smtp": Smtp,
    "stripe": StripeMock,
}


def state_root(state_dir: Path | None = None) -> Path:
    """The state dir: the argument, else $SENSORMINE_STATE_DIR, else `<cwd>/.sensormine`."""
    if state_dir is not None:
        return Path(state_dir).absolute()
    env = os.environ.get("SENSORMINE_STATE_DIR")
    return Path(env).absolute() if env else Path.cwd() / ".sensormine"


def _services_dir(root: Path) -> Path:
    return root / "services"


def _validate(names: Iterable[str]) -> list[str]:
    wanted = [n.strip() for n in ([names] if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in _CLASSES]
    if unknown:
        raise ServiceError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(ALL_SERVICES)}")
    return [n for n in ALL_SERVICES if n in wanted]  # canonical order, no duplicates


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize launchers sharing a state dir (two `up`s must not start two brokers)."""
    d = _services_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@dataclass
class _State:
    """services.json: running services, plus the last record of stopped ones (to reuse their ports)."""

    running: dict[str, Record] = field(default_factory=dict)
    stopped: dict[str, Record] = field(default_factory=dict)


def _load(root: Path) -> _State:
    path = _services_dir(root) / "services.json"
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return _State()
    except json.JSONDecodeError as exc:
        raise ServiceError(
            f"{path} is not valid JSON ({exc}); stop the processes it lists by hand and delete it."
        ) from exc

    def section(key: str) -> dict[str, Record]:
        return {n: Record.from_json(d) for n, d in raw.get(key, {}).items() if n in _CLASSES}

    return _State(section("services"), section("stopped"))


def _save(root: Path, state: _State) -> None:
    path = _services_dir(root) / "services.json"
    tmp = path.with_suffix(".json.tmp")

    def section(records: dict[str, Record]) -> dict[str, Any]:
        return {n: records[n].to_json() for n in ALL_SERVICES if n in records}

    body = {"services": section(state.running), "stopped": section(state.stopped)}
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)  # atomic: readers never see half a file


def _service(name: str, root: Path, embedded: bool = False) -> Service:
    return _CLASSES[name](root, embedded=embedded)


def _running_env(root: Path, records: dict[str, Record]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name in ALL_SERVICES:
        rec = records.get(name)
        if rec is not None:
            svc = _service(name, root, rec.mode == "embedded")
            if svc.is_running(rec):
                env.update(svc.env(rec))
    return env


def export_lines(env: dict[str, str]) -> str:
    """`export K=V` lines (shell-quoted), one per setting."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def _write_env(root: Path, env: dict[str, str]) -> None:
    header = "# written by `sensormine services up`; source it or use `sensormine services env`\n"
    (root / "services.env").write_text(header + export_lines(env))


def up(
    names: Iterable[str] = ALL_SERVICES,
    state_dir: Path | None = None,
    progress: Callable[[str], None] = print,
    *,
    embedded: bool = False,
) -> dict[str, str]:
    """Start what is missing; return the SENSORMINE_* env vars for everything running.

    The settings are also written to <state>/services.env as `export K=V` lines.
    `embedded=True` uses the pip-wheel PostgreSQL (pgserver) and MQTT broker (amqtt).
    """
    root = state_root(state_dir)
    wanted = _validate(names)
    t0 = time.monotonic()
    with _locked(root):
        state = _load(root)
        todo: list[tuple[Service, Record | None]] = []
        for name in wanted:
            prev = state.running.get(name)
            if prev is not None and _service(name, root, prev.mode == "embedded").is_running(prev):
                progress(f"{name}: already running at {prev.url} (pid {prev.pid})")
                continue
            if prev is not None:
                if pid_alive(prev.pid, prev.start_time):
                    # Ours but not answering (hung, or port taken over): replace it.
                    progress(f"{name}: pid {prev.pid} does not answer on port {prev.port}; restarting it")
                    _service(name, root, prev.mode == "embedded").stop(prev)
                else:
                    progress(f"{name}: recorded process {prev.pid} is gone; starting it again")
                del state.running[name]
            # The previous record only lends its ports, so URLs stay stable across restarts.
            todo.append((_service(name, root, embedded), prev or state.stopped.get(name)))

        if todo:
            system.ensure_installed([r for svc, _ in todo for r in svc.requirements()], progress)
            errors = _launch_all(todo, state, progress)
            _save(root, state)  # record what did start, so `down` can stop it
            if errors:
                _write_env(root, _running_env(root, state.running))
                raise ServiceError("\n\n".join(errors))
        env = _running_env(root, state.running)
        _write_env(root, env)
    if todo:
        progress(f"services up in {time.monotonic() - t0:.1f} s; settings in {root / 'services.env'}")
    return env


def _launch_all(todo: list[tuple[Service, Record | None]], state: _State, progress: Progress) -> list[str]:
    """Launch services concurrently into `state.running`; return one error message per failure."""
    errors: list[str] = []
    futures: dict[str, Future[Record]] = {}
    try:
        # All at once: Kafka's JVM dominates a cold start and the others hide behind it.
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            futures = {svc.name: pool.submit(svc.launch, prev, progress) for svc, prev in todo}
            wait(futures.values())
    finally:
        # Even on Ctrl-C, remember every server that did come up so `down` can stop it.
        for name, fut in futures.items():
            if not fut.done() or fut.cancelled():
                continue
            exc = fut.exception()
            if exc is None:
                state.running[name] = fut.result()
                state.stopped.pop(name, None)
            elif isinstance(exc, ServiceError):
                errors.append(str(exc))
            else:  # report every service's failure, not just the first
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return errors


def down(
    names: Iterable[str] = ALL_SERVICES,
    state_dir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> None:
    """Stop the services this state dir started (and only those); forget them in services.json."""
    root = state_root(state_dir)
    wanted = _validate(names)
    if not (_services_dir(root) / "services.json").exists():
        return
    with _locked(root):
        state = _load(root)
        for name in reversed(wanted):  # reverse start order, so consumers go before what they use
            rec = state.running.pop(name, None)
            if rec is None:
                continue
            if pid_alive(rec.pid, rec.start_time):  # start time guards against a recycled pid
                progress(f"{name}: stopping pid {rec.pid} ...")
                _service(name, root, rec.mode == "embedded").stop(rec)
            state.stopped[name] = rec
            _save(root, state)
        _write_env(root, _running_env(root, state.running))


def status(state_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Each service's state: {"state": "running"|"stopped", "running", "pid", "url", "port", "mode", "log"}."""
    root = state_root(state_dir)
    records = _load(root).running
    out: dict[str, dict[str, Any]] = {}
    for name in ALL_SERVICES:
        rec = records.get(name)
        running = rec is not None and _service(name, root, rec.mode == "embedded").is_running(rec)
        out[name] = {
            "state": "running" if running else "stopped",
            "running": running,
            "pid": rec.pid if rec and running else None,
            "url": rec.url if rec and running else None,
            "port": rec.port if rec and running else None,
            "mode": rec.mode if rec else None,
            "log": rec.log if rec else None,
        }
    return out


def env(state_dir: Path | None = None) -> dict[str, str]:
    """SENSORMINE_* settings of the services running now (starts nothing)."""
    root = state_root(state_dir)
    return _running_env(root, _load(root).running)
