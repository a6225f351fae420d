"""PostgreSQL: Debian's server binaries (or the `pgserver` wheel's with --embedded) in a private data dir."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from sensormine.services import process, system
from sensormine.services.base import EMBEDDED_HINT, Progress, Record, Service
from sensormine.services.errors import ServiceError

PREFERRED_MAJOR = 15
DATABASE = "sensormine"
SUPERUSER = "postgres"

# Run-time roles (docs/decisions.md, "No superuser at run time"). Logins hold no privilege of their
# own (NOINHERIT): every connection takes one of the function roles (SET ROLE at connect, or
# SET LOCAL ROLE per transaction for tenant-scoped work), whose grants and policies are migration 016's.
FUNCTION_ROLES = (
    "sensormine_reader",  # tenant-scoped reads (RLS by the session's visible tenants)
    "sensormine_writer",  # tenant-scoped writes, same policies
    "sensormine_auth",  # credential and device-key lookups, before the caller's tenants are known
    "sensormine_ingest",  # the hot-store write path: telemetry, dead letters, offsets, device status
    "sensormine_metering",  # API-call usage, its flushes and tenant events
    "sensormine_lake",  # compaction, quality checks and hot-store retention
    "sensormine_alerts",  # the rule evaluator: every tenant's rules and devices, every tenant's alarms
)
OWNER = "sensormine_owner"  # owns the schema and runs migrations; no superuser, no BYPASSRLS
LOGINS: dict[str, tuple[str, ...]] = {
    OWNER: (),
    # Each process kind logs in as its own role, a member of the function roles it needs.
    "sensormine_api": (
        "sensormine_reader",
        "sensormine_writer",
        "sensormine_auth",
        "sensormine_ingest",
        "sensormine_metering",
        "sensormine_alerts",  # without Kafka, rules are evaluated behind the in-process write path
    ),
    "sensormine_ingestd": ("sensormine_ingest", "sensormine_alerts"),
    "sensormine_streamd": ("sensormine_alerts",),  # the stream processor over Kafka
    "sensormine_dagster": ("sensormine_lake",),
    # Operators, tools and tests on one machine: every function role, still no privilege of its own.
    "sensormine_app": FUNCTION_ROLES,
}
APP_LOGIN = "sensormine_app"
PASSWORDS_FILE = "credentials.json"
PGPASS_FILE = "pgpass"
HBA = (
    "# written by `sensormine services up`: passwords (scram-sha-256) for every connection\n"
    "local all all scram-sha-256\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
    "host all all ::1/128 scram-sha-256\n"
)

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


def bootstrap_roles(admin: Any, passwords: dict[str, str], database: str = DATABASE) -> None:
    """Create (or update) the run-time roles and hand `database` and its objects to the owner.

    Run once per cluster by a superuser (the launcher does; elsewhere `sensormine db bootstrap`),
    before the first migration. `admin` is an autocommit psycopg connection to `database`.
    """
    from psycopg import sql

    def role_exists(name: str) -> bool:
        return admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None

    limits = sql.SQL("NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")
    for role in FUNCTION_ROLES:
        verb = "ALTER" if role_exists(role) else "CREATE"
        admin.execute(sql.SQL(verb + " ROLE {} NOLOGIN {}").format(sql.Identifier(role), limits))
    for login, members_of in LOGINS.items():
        verb = "ALTER" if role_exists(login) else "CREATE"
        admin.execute(
            sql.SQL(verb + " ROLE {} LOGIN NOINHERIT {} PASSWORD {}").format(
                sql.Identifier(login), limits, sql.Literal(passwords[login])
            )
        )
        for role in members_of:
            admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(login)))
    admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database), sql.Identifier(OWNER)))
    admin.execute(sql.SQL("GRANT CREATE, USAGE ON SCHEMA public TO {}").format(sql.Identifier(OWNER)))
    # A database migrated before the owner role existed: its objects move to the owner.
    admin.execute(
        """DO $$ DECLARE r record; BEGIN
            FOR r IN SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                       AND pg_get_userbyid(c.relowner) <> 'sensormine_owner' AND NOT c.relispartition LOOP
                EXECUTE format('ALTER TABLE %I OWNER TO sensormine_owner', r.relname);
            END LOOP;
            FOR r IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relkind = 'S'
                       AND pg_get_userbyid(c.relowner) <> 'sensormine_owner'
                       AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i')) LOOP
                EXECUTE format('ALTER SEQUENCE %I OWNER TO sensormine_owner', r.relname);
            END LOOP;
            FOR r IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relispartition
                       AND pg_get_userbyid(c.relowner) <> 'sensormine_owner' LOOP
                EXECUTE format('ALTER TABLE %I OWNER TO sensormine_owner', r.relname);
            END LOOP;
            FOR r IN SELECT p.oid::regprocedure AS f FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> 'sensormine_owner' LOOP
                EXECUTE format('ALTER FUNCTION %s OWNER TO sensormine_owner', r.f);
            END LOOP;
        END $$"""
    )


def role_url(url: str, login: str) -> str:
    """`url` (postgresql://user@host:port/db) logging in as `login` instead."""
    scheme, _, rest = url.partition("://")
    _, at, hostpart = rest.rpartition("@")
    return f"{scheme}://{login}@{hostpart if at else rest}"


class Postgres(Service):
    """PostgreSQL with password (scram-sha-256) authentication on loopback and a `sensormine` database."""

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
            pwfile = self.dir / "initdb-password"
            system.write_private(pwfile, self.passwords()[SUPERUSER] + "\n")
            if user is not None:
                os.chown(pwfile, user.pw_uid, user.pw_gid)
            try:
                res = process.run(
                    [
                        bindir / "initdb",
                        "-D",
                        data,
                        "-U",
                        SUPERUSER,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "-E",
                        "UTF8",
                        "--no-locale",
                        "-N",
                    ],
                    user=user,
                    cwd=self.dir,
                )
            finally:
                pwfile.unlink(missing_ok=True)
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
            f"postgresql://{APP_LOGIN}@127.0.0.1:{port}/{DATABASE}",
            log,
            extra={
                "bindir": str(bindir),
                "data": str(data),
                "user": user.pw_name if user else None,
                "socket_dir": str(sockets),
            },
        )

    @property
    def passwords_file(self) -> Path:
        """The generated passwords of the superuser and the run-time logins (mode 0600)."""
        return self.dir / PASSWORDS_FILE

    @property
    def pgpass_file(self) -> Path:
        """The same passwords as a libpq password file, exported as PGPASSFILE."""
        return self.dir / PGPASS_FILE

    def passwords(self) -> dict[str, str]:
        """The passwords, generated on first use and kept across restarts."""
        known: dict[str, str] = {}
        if self.passwords_file.exists():
            known = json.loads(self.passwords_file.read_text())
        wanted = {SUPERUSER, *LOGINS}
        if not wanted <= known.keys():
            known |= {name: secrets.token_urlsafe(24) for name in wanted - known.keys()}
            system.write_private(self.passwords_file, json.dumps(known, indent=2) + "\n")
        return known

    def _superuser(self, rec: Record, dbname: str = "postgres", **kw: Any) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=rec.port,
            user=SUPERUSER,
            password=self.passwords()[SUPERUSER],
            dbname=dbname,
            **kw,
        )

    def probe(self, rec: Record) -> bool:
        """`select 1` over TCP."""
        with self._superuser(rec, connect_timeout=3) as conn:
            return bool(conn.execute("select 1").fetchone() == (1,))

    def after_ready(self, rec: Record, progress: Progress) -> None:
        """Passwords on, the `sensormine` database, and the run-time roles (docs/decisions.md)."""
        from psycopg import sql

        passwords = self.passwords()
        with self._superuser(rec, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(passwords[SUPERUSER])
                )
            )
            if conn.execute("select 1 from pg_database where datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f'create database "{DATABASE}"')
                progress(f"postgres: created database {DATABASE}")
        with self._superuser(rec, dbname=DATABASE, autocommit=True) as conn:
            bootstrap_roles(conn, passwords)
        self._require_passwords(rec, progress)
        # Any port: tests reach the server through TCP proxies too (one cluster per state dir and file).
        lines = "".join(f"127.0.0.1:*:*:{name}:{pw}\n" for name, pw in sorted(passwords.items()))
        system.write_private(self.pgpass_file, lines)

    def _require_passwords(self, rec: Record, progress: Progress) -> None:
        """A data dir made before passwords (trust): switch its pg_hba.conf to scram-sha-256 and reload."""
        hba = Path(rec.extra["data"]) / "pg_hba.conf"
        if hba.read_text() == HBA:
            return
        hba.write_text(HBA)
        owner = rec.extra.get("user")
        if owner and system.is_root():
            pw = pwd.getpwnam(owner)
            os.chown(hba, pw.pw_uid, pw.pw_gid)
        os.kill(rec.pid, signal.SIGHUP)
        progress("postgres: pg_hba.conf wants scram-sha-256 passwords on every connection")

    def env(self, rec: Record) -> dict[str, str]:
        """SENSORMINE_DATABASE_URL (the tools' login), the migration and superuser URLs, and PGPASSFILE."""
        return {
            "SENSORMINE_DATABASE_URL": rec.url,
            "SENSORMINE_DATABASE_MIGRATE_URL": role_url(rec.url, OWNER),
            "SENSORMINE_DATABASE_ADMIN_URL": role_url(rec.url, SUPERUSER),
            "PGPASSFILE": str(self.pgpass_file),
        }

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
