"""PostgreSQL: Debian's server binaries (or the `pgserver` wheel's with --embedded) in a private data dir."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path

from sensormine.services import process, system
from sensormine.services.base import EMBEDDED_HINT, Progress, Record, Service
from sensormine.services.errors import ServiceError

PREFERRED_MAJOR = 15
DATABASE = "sensormine"

# Tuned for a test/bench box: keep fsync (crash safety of the files) but do not wait for
# WAL flushes on commit, and give checkpoints room so bulk loads are not throttled.
TUNING = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "synchronous_commit": "off",
    "max_wal_size": "2GB",
    "log_min_messages": "warning",
}

# sun_path is 108 bytes on Linux; leave room for "/.s.PGSQL.65535" and the NUL.
_MAX_SOCKET_DIR = 90


def system_bindir() -> Path | None:
    """Bin dir of the Debian PostgreSQL server, preferring major version 15."""
    found = {p.parent.parent.name: p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")}
    if str(PREFERRED_MAJOR) in found:
        return found[str(PREFERRED_MAJOR)]
    numeric = sorted((k for k in found if k.isdigit()), key=int)
    return found[numeric[-1]] if numeric else None


def embedded_bindir() -> Path | None:
    """Bin dir of the PostgreSQL build shipped inside the `pgserver` wheel (not imported: it has side effects)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "postgres").exists() else None


def _major(bindir: Path) -> str:
    out = process.run([bindir / "postgres", "--version"], timeout=30).stdout
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    if not m:
        raise ServiceError(f"cannot tell the PostgreSQL version of {bindir}/postgres: {out!r}")
    return m.group(1)


class Postgres(Service):
    """PostgreSQL with trust auth on loopback and a `sensormine` database."""

    name = "postgres"
    ready_timeout = 90.0
    has_embedded = True

    def drops_privileges(self) -> bool:
        """initdb and postgres refuse root: they run as the postgres user."""
        return True

    def requirements(self) -> list[system.Requirement]:
        """Debian `postgresql` unless running embedded (the wheel is a Python dependency)."""
        if self.embedded:
            return []

        def find() -> str | None:
            b = system_bindir()
            return str(b) if b else None

        return [system.Requirement("PostgreSQL server", ("postgresql",), find, EMBEDDED_HINT)]

    def _bindir(self) -> Path:
        bindir = embedded_bindir() if self.embedded else system_bindir()
        if bindir is None:
            if self.embedded:
                raise ServiceError("the `pgserver` wheel is not installed; run `uv sync`.")
            raise ServiceError(
                "PostgreSQL server binaries not found under /usr/lib/postgresql. "
                "Install with `sudo apt-get install -y postgresql`, or use `sensormine services up --embedded`."
            )
        if self.embedded and system.is_root() and not system.others_can_reach(bindir):
            # The wheel sits in a venv the postgres user cannot enter (a clone in a private
            # folder): run a copy of its installation from a place that user can reach.
            # Its binaries find their libraries at $ORIGIN/../../../pgserver.libs: keep that layout.
            install = bindir.parent  # site-packages/pgserver/pginstall
            home = system.private_state_fallback(self.state_root)
            copy = home / "pgserver" / "pginstall"
            if not (copy / "bin" / "postgres").exists():
                shutil.copytree(install.parent.parent / "pgserver.libs", home / "pgserver.libs", dirs_exist_ok=True)
                shutil.copytree(install, copy, dirs_exist_ok=True)
            bindir = copy / "bin"
        return bindir

    def _socket_dir(self, user: pwd.struct_passwd | None) -> Path:
        """The service dir, unless its path is too long for a unix socket (deep temp dirs)."""
        if len(str(self.dir.resolve())) <= _MAX_SOCKET_DIR:
            return self.dir
        digest = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:10]
        short = Path(tempfile.gettempdir()) / f"sensormine-pg-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(short, user.pw_uid, user.pw_gid)
        return short

    def start(self, previous: Record | None, progress: Progress) -> Record:
        """initdb on first use, then run `postgres` as the postgres user (when root)."""
        bindir = self._bindir()
        major = _major(bindir)
        # initdb/postgres refuse to run as root: hand the service dir to the postgres user.
        user = system.service_user("postgres")
        if user is not None:
            system.ensure_reachable(self.dir, user, self.state_root)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        # One data dir per major version, so switching system <-> embedded never clashes.
        data = self.dir / f"pg{major}"
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)  # leftovers of an interrupted initdb
            progress(f"postgres: initdb PostgreSQL {major} in {data} (first run) ...")
            res = process.run(
                [bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "-N"],
                user=user,
                cwd=self.dir,
            )
            if res.returncode != 0:
                raise ServiceError(f"postgres: initdb failed:\n{res.stdout}{res.stderr}")
            with open(data / "postgresql.conf", "a") as fh:
                fh.write("\ninclude_if_exists = 'sensormine.conf'\n")
        conf = data / "sensormine.conf"
        conf.write_text(
            "# written by `sensormine services up`; overwritten on every start\n"
            + "".join(f"{k} = {v}\n" for k, v in TUNING.items())
        )
        if user is not None:
            os.chown(conf, user.pw_uid, user.pw_gid)
        port = process.free_port(previous.port if previous else None)
        sockets = self._socket_dir(user)
        log = self.dir / "postgres.log"
        proc = process.spawn(
            [bindir / "postgres", "-D", data, "-p", str(port), "-k", sockets], log=log, cwd=self.dir, user=user
        )
        progress(f"postgres: starting PostgreSQL {major} on 127.0.0.1:{port} ...")
        return self.record(
            proc.pid,
            port,
            f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}",
            log,
            extra={
                "bindir": str(bindir),
                "data": str(data),
                "user": user.pw_name if user else None,
                "socket_dir": str(sockets),
            },
        )

    def probe(self, rec: Record) -> bool:
        """`select 1` over TCP."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=rec.port, user="postgres", dbname="postgres", connect_timeout=3
        ) as conn:
            return conn.execute("select 1").fetchone() == (1,)

    def after_ready(self, rec: Record, progress: Progress) -> None:
        """Create the `sensormine` database if it does not exist yet."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=rec.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            if conn.execute("select 1 from pg_database where datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f'create database "{DATABASE}"')
                progress(f"postgres: created database {DATABASE}")

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_DATABASE_URL."""
        return {"SENSORMINE_DATABASE_URL": rec.url}

    def stop(self, rec: Record) -> None:
        """`pg_ctl stop -m fast` as the owner; signals if that does not do it."""
        if not process.pid_alive(rec.pid, rec.start_time):
            return
        bindir, data, owner = rec.extra.get("bindir"), rec.extra.get("data"), rec.extra.get("user")
        if bindir and data and Path(bindir, "pg_ctl").exists():
            user = pwd.getpwnam(owner) if owner and system.is_root() else None
            process.run(
                [Path(bindir, "pg_ctl"), "stop", "-D", data, "-m", "fast", "-w", "-t", "60"], user=user, timeout=90
            )
        process.terminate(rec.pid, rec.start_time, self.stop_grace)
