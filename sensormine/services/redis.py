"""Redis: Debian's `redis-server`, cache-only (no RDB snapshots, no AOF)."""

from __future__ import annotations

import socket
from pathlib import Path

from sensormine.services import process, system
from sensormine.services.base import Progress, Record, Service


def redis_ping(port: int, timeout: float = 2.0) -> bool:
    """Send an inline PING and expect +PONG (no client library needed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


class Redis(Service):
    """redis-server on loopback with persistence off."""

    name = "redis"
    ready_timeout = 30.0

    def requirements(self) -> list[system.Requirement]:
        """Debian `redis-server`."""
        return [system.binary("redis-server", ("redis-server",))]

    def start(self, previous: Record | None, progress: Progress) -> Record:
        """Spawn redis-server in the foreground (we manage the process, not redis)."""
        exe = system.which("redis-server")
        assert exe is not None  # requirements() were ensured by `up`
        port = process.free_port(previous.port if previous else None)
        log = self.dir / "redis.log"
        cmd: list[str | Path] = [
            exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", self.dir,
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
        ]  # fmt: skip
        progress(f"redis: starting on 127.0.0.1:{port} ...")
        proc = process.spawn(cmd, log=log, cwd=self.dir)
        return self.record(proc.pid, port, f"redis://127.0.0.1:{port}/0", log)

    def probe(self, rec: Record) -> bool:
        """PING."""
        return redis_ping(rec.port)

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_REDIS_URL."""
        return {"SENSORMINE_REDIS_URL": rec.url}
