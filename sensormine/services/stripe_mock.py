"""stripe-mock: Stripe's official API mock (a Go program), built once from Go modules and cached.

It answers the whole Stripe API on loopback, validating every request against Stripe's OpenAPI
description, but keeps no state: it returns canned objects with fresh ids and ignores
`Idempotency-Key`. What the platform must not create twice it therefore records itself (the
`stripe_*` columns and tables), and tests read those, not the mock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from sensormine.services import process, system
from sensormine.services.base import Progress, Record, Service
from sensormine.services.errors import ServiceError

STRIPE_MOCK_VERSION = "v0.203.0"
API_KEY = "sk_test_sensormine"  # stripe-mock accepts any key of this shape
WEBHOOK_SECRET = "whsec_sensormine_local"  # signs webhook payloads sent to the local API (stripe-mock sends none)


def cache_dir() -> Path:
    """Binary cache outside the repo, so fresh clones and other state dirs reuse the build."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sensormine" / f"stripe-mock-{STRIPE_MOCK_VERSION}"


def binary_path() -> Path:
    """Where the built `stripe-mock` lives."""
    return cache_dir() / "bin" / "stripe-mock"


def ensure_binary(progress: Progress) -> Path:
    """`go install github.com/stripe/stripe-mock@<version>` into the cache unless it is there."""
    binary = binary_path()
    if binary.exists():
        return binary
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # two launchers must not build into one dir
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        go = system.which("go")
        if go is None:
            raise ServiceError("stripe: `go` not found; install with `sudo apt-get install -y golang-go`.")
        progress(f"stripe: building stripe-mock {STRIPE_MOCK_VERSION} from Go modules (first run only, ~1 min) ...")
        partial = cache / "bin.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        env = {"GOBIN": str(partial), "GOFLAGS": "-buildvcs=false"}
        module = f"github.com/stripe/stripe-mock@{STRIPE_MOCK_VERSION}"
        res = process.run([go, "install", module], env=env, timeout=1200)
        if res.returncode != 0 or not (partial / "stripe-mock").exists():
            tail = "\n".join((res.stdout + res.stderr).splitlines()[-20:])
            raise ServiceError(
                f"stripe: building stripe-mock failed (exit {res.returncode}):\n{tail}\n"
                f"Next: check that the Go module proxy is reachable (`go env GOPROXY`), then run "
                f"`GOBIN={partial} go install github.com/stripe/stripe-mock@{STRIPE_MOCK_VERSION}`."
            )
        shutil.rmtree(binary.parent, ignore_errors=True)
        partial.rename(binary.parent)
        progress(f"stripe: cached stripe-mock in {binary.parent}")
    return binary


class StripeMock(Service):
    """stripe-mock on loopback (HTTP only: its HTTPS listener is pinned to a loopback port too)."""

    name = "stripe"
    ready_timeout = 30.0
    stop_grace = 5.0

    def requirements(self) -> list[system.Requirement]:
        """Go, until the binary is cached."""
        return [] if binary_path().exists() else [system.binary("go", ("golang-go",))]

    def start(self, previous: Record | None, progress: Progress) -> Record:
        """Build if needed, then spawn `stripe-mock -http-addr 127.0.0.1:P -https-addr 127.0.0.1:Q`."""
        binary = ensure_binary(progress)
        port = process.free_port(previous.port if previous else None)
        https = process.free_port(previous.ports.get("https") if previous else None)
        while https == port:
            https = process.free_port()
        log = self.dir / "stripe-mock.log"
        # Both addresses: with only -http-addr it also listens for HTTPS on every interface.
        cmd: list[str | Path] = [binary, "-http-addr", f"127.0.0.1:{port}", "-https-addr", f"127.0.0.1:{https}"]
        progress(f"stripe: starting stripe-mock on 127.0.0.1:{port} ...")
        proc = process.spawn(cmd, log=log, cwd=self.dir)
        return self.record(proc.pid, port, f"http://127.0.0.1:{port}", log, ports={"https": https})

    def probe(self, rec: Record) -> bool:
        """An authenticated `GET /v1/customers` answers 200."""
        req = urllib.request.Request(f"{rec.url}/v1/customers", headers={"Authorization": f"Bearer {API_KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_STRIPE_API_BASE, SENSORMINE_STRIPE_API_KEY and SENSORMINE_STRIPE_WEBHOOK_SECRET."""
        return {
            "SENSORMINE_STRIPE_API_BASE": rec.url,
            "SENSORMINE_STRIPE_API_KEY": API_KEY,
            "SENSORMINE_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
