"""S3: moto's stand-alone server (from the `moto[server]` Python dependency)."""

from __future__ import annotations

import http.client
import shutil
import sys
from pathlib import Path

from sensormine.services import process, system
from sensormine.services.base import Progress, Record, Service
from sensormine.services.errors import ServiceError

ACCESS_KEY = "test"
SECRET_KEY = "test"
REGION = "us-east-1"


def moto_server_path() -> str | None:
    """`moto_server` next to the running interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    return str(beside) if beside.exists() else shutil.which("moto_server")


class S3(Service):
    """In-memory S3 (moto) on loopback; buckets vanish when it stops."""

    name = "s3"
    ready_timeout = 45.0

    def requirements(self) -> list[system.Requirement]:
        """None from apt: moto comes with the project's Python dependencies."""
        return []

    def start(self, previous: Record | None, progress: Progress) -> Record:
        """Spawn moto_server."""
        exe = moto_server_path()
        if exe is None:
            raise ServiceError("moto_server not found; run `uv sync` (it comes with the moto[server] dependency).")
        port = process.free_port(previous.port if previous else None)
        log = self.dir / "s3.log"
        progress(f"s3: starting moto_server on 127.0.0.1:{port} ...")
        proc = process.spawn([exe, "-H", "127.0.0.1", "-p", str(port)], log=log, cwd=self.dir)
        return self.record(proc.pid, port, f"http://127.0.0.1:{port}", log)

    def probe(self, rec: Record) -> bool:
        """Any HTTP answer on / means the server is up."""
        conn = http.client.HTTPConnection("127.0.0.1", rec.port, timeout=3)
        try:
            conn.request("GET", "/")
            return conn.getresponse().status < 500
        finally:
            conn.close()

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_S3_* (endpoint, dummy keys, region)."""
        return {
            "SENSORMINE_S3_ENDPOINT": rec.url,
            "SENSORMINE_S3_ACCESS_KEY": ACCESS_KEY,
            "SENSORMINE_S3_SECRET_KEY": SECRET_KEY,
            "SENSORMINE_S3_REGION": REGION,
        }
