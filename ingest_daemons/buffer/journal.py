"""The buffer's SQLite file: schema, append, read in order, delete, compact, the bound, the file lock.

`Journal` owns the sqlite3 connection and every statement; it keeps the row and byte counts of what
is on disk exact, so callers never ask the file. One owner per file: other processes are kept out
by an flock, and a second owner in the same process closes the first (`Owner`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal, NamedTuple, Protocol

from sensormine.reading import now_us

log = logging.getLogger("sensormine.ingest.buffer")

DropPolicy = Literal["oldest", "newest"]

ROW_OVERHEAD = 64  # bytes counted per buffered message on top of its body and names
SCHEMA_VERSION = 1

READINGS = 0  # kind of a row whose body is a Kafka envelope of readings
REJECT = 1  # kind of a row whose body is a dead letter's original bytes


class BufferInUse(RuntimeError):
    """Another process holds the buffer file (two daemons must never drain the same buffer)."""


class Owner(Protocol):
    """What holds a journal open: closed first when the same file is opened again in this process."""

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


class Row(NamedTuple):
    """One buffered message as stored on disk."""

    seq: int
    kind: int
    tenant_id: str | None
    device_id: str | None
    source: str
    origin: str | None
    reason: str | None
    readings: int
    size: int
    body: bytes

    @classmethod
    def new(
        cls,
        seq: int,
        kind: int,
        tenant_id: str | None,
        device_id: str | None,
        source: str,
        origin: str | None,
        reason: str | None,
        readings: int,
        body: bytes,
    ) -> Row:
        """A row to append, with the bytes it counts against the bound."""
        size = ROW_OVERHEAD + len(body) + sum(len(s or "") for s in (tenant_id, device_id, origin, reason))
        return cls(seq, kind, tenant_id, device_id, source, origin, reason, readings, size, body)


class Appended(NamedTuple):
    """What `Journal.append` did to make room: incoming seqs not stored, stored rows deleted."""

    dropped: frozenset[int]
    freed: int
    freed_readings: int


# One owner per buffer file and process: opening the file again (a daemon restarted in the same
# process) closes the earlier owner first, as an MQTT broker ends an older session of the same
# client id. Other processes are kept out by an flock.
_OPEN: dict[str, weakref.ref[Owner]] = {}
_OPEN_LOCK = threading.Lock()


class Journal:
    """The SQLite file at `path` (absolute), opened for `owner`: rows in arrival (seq) order.

    `rows` and `bytes` count what is on disk; `max_seq` is the highest seq found when opened.
    Not thread-safe: one thread appends, reads and deletes (the counts may be read from any).
    """

    def __init__(self, path: Path, owner: Owner) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _take_over(path)
        self._lock_file = _lock_file(path)
        try:
            self._db = _open_db(path)
            rows, size, max_seq = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(max(seq), 0) FROM buffered"
            ).fetchone()
        except BaseException:
            self._lock_file.close()
            raise
        self.rows: int = rows
        self.bytes: int = size
        self.max_seq: int = max_seq
        with _OPEN_LOCK:
            _OPEN[str(path)] = weakref.ref(owner)

    def append(self, rows: list[Row], *, max_bytes: int, drop: DropPolicy, in_flight_hi: int) -> Appended:
        """Append `rows` (in seq order) in one transaction, first making room to stay within `max_bytes`:
        per `drop`, incoming rows are left out ("newest") or the oldest stored rows above `in_flight_hi`
        and incoming ones go ("oldest")."""
        stored_at = now_us()
        keep, dropped, cut = self._make_room(rows, max_bytes, drop, in_flight_hi)
        freed_rows = freed_bytes = freed_readings = 0
        with _transaction(self._db):
            if cut is not None:
                lo, hi = cut
                freed_rows, freed_bytes, freed_readings = self._db.execute(
                    "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(readings), 0) FROM buffered "
                    "WHERE seq > ? AND seq <= ?",
                    (lo, hi),
                ).fetchone()
                self._db.execute("DELETE FROM buffered WHERE seq > ? AND seq <= ?", (lo, hi))
            self._db.executemany(
                "INSERT INTO buffered (seq, kind, tenant_id, device_id, source, origin, reason, readings, size, "
                "stored_at_us, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*r[:-1], stored_at, r.body) for r in keep],  # the columns in Row's order, then stored_at_us
            )
        self.rows += len(keep) - freed_rows
        self.bytes += sum(r.size for r in keep) - freed_bytes
        return Appended(frozenset(r.seq for r in dropped), freed_rows, freed_readings)

    def _make_room(
        self, rows: list[Row], max_bytes: int, drop: DropPolicy, in_flight_hi: int
    ) -> tuple[list[Row], list[Row], tuple[int, int] | None]:
        """Which incoming rows to keep, which to drop, and which stored seq range (lo, hi] to delete."""
        need = self.bytes + sum(r.size for r in rows) - max_bytes
        if need <= 0:
            return rows, [], None
        if drop == "newest":
            keep, dropped, total = [], [], self.bytes
            for row in rows:
                if total + row.size <= max_bytes:
                    keep.append(row)
                    total += row.size
                else:
                    dropped.append(row)
            return keep, dropped, None
        # Oldest first, over stored rows (except those in flight) and incoming ones merged by seq.
        lo = in_flight_hi
        stored = self._db.execute("SELECT seq, size FROM buffered WHERE seq > ? ORDER BY seq", (lo,))
        nxt = stored.fetchone()
        freed, cut, i = 0, None, 0
        while freed < need and (nxt is not None or i < len(rows)):
            if nxt is not None and (i >= len(rows) or nxt[0] < rows[i].seq):
                freed += nxt[1]
                cut = nxt[0]
                nxt = stored.fetchone()
            else:
                freed += rows[i].size
                i += 1
        stored.close()
        return rows[i:], rows[:i], (lo, cut) if cut is not None else None

    def read(self, below: int, limit: int) -> list[Row]:
        """The oldest `limit` rows with a seq below `below`, in seq order."""
        cur = self._db.execute(
            "SELECT seq, kind, tenant_id, device_id, source, origin, reason, readings, size, body "
            "FROM buffered WHERE seq < ? ORDER BY seq LIMIT ?",
            (below, limit),
        )
        return [Row(*r) for r in cur.fetchall()]

    def recount(self) -> None:
        """Take the row and byte counts from the file (when they disagree with it)."""
        self.rows, self.bytes = self._db.execute("SELECT count(*), coalesce(sum(size), 0) FROM buffered").fetchone()

    def delete(self, seqs: list[int]) -> int:
        """Delete rows by seq (those absent are ignored), keep the counts exact; returns how many went."""
        rows = size = 0
        with _transaction(self._db):
            for i in range(0, len(seqs), 500):
                chunk = seqs[i : i + 500]
                marks = ",".join("?" * len(chunk))
                n, b = self._db.execute(
                    f"SELECT count(*), coalesce(sum(size), 0) FROM buffered WHERE seq IN ({marks})", chunk
                ).fetchone()
                self._db.execute(f"DELETE FROM buffered WHERE seq IN ({marks})", chunk)
                rows, size = rows + n, size + b
        self.rows -= rows
        self.bytes -= size
        return rows

    def compact(self) -> None:
        """Give disk space back once empty."""
        try:
            self._db.execute("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("could not compact %s: %s", self.path, exc)

    def close_db(self) -> None:
        """Close the database connection."""
        self._db.close()

    def release(self, owner: Owner) -> None:
        """Let go of the file: forget `owner` as its holder in this process and drop the flock."""
        with _OPEN_LOCK:
            ref = _OPEN.get(str(self.path))
            if ref is not None and ref() is owner:
                del _OPEN[str(self.path)]
        self._lock_file.close()  # releases the flock


def _open_db(path: Path) -> sqlite3.Connection:
    """The buffer database: WAL journal, fsync on commit, space reclaimable."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"{path}: SQLite refused WAL mode ({mode})")
    db.execute("PRAGMA synchronous = FULL")  # a commit is on disk before `done` acknowledges the source
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, SCHEMA_VERSION):
        raise RuntimeError(f"{path}: buffer format {version} is not {SCHEMA_VERSION}; drain it with that version")
    db.execute(
        """CREATE TABLE IF NOT EXISTS buffered (
            seq INTEGER PRIMARY KEY,      -- arrival order; drained in this order
            kind INTEGER NOT NULL,        -- 0: readings (body is a Kafka envelope), 1: dead letter (original bytes)
            tenant_id TEXT,
            device_id TEXT,
            source TEXT NOT NULL,
            origin TEXT,
            reason TEXT,
            readings INTEGER NOT NULL,
            size INTEGER NOT NULL,        -- bytes counted against the bound
            stored_at_us INTEGER NOT NULL,
            body BLOB NOT NULL
        )"""
    )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _lock_file(path: Path) -> IO[str]:
    """An exclusive flock next to the database, held while the journal is open."""
    fh = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise BufferInUse(
            f"{path} is in use by {holder}; give each daemon its own buffer (state dir or client id)"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


def _take_over(path: Path) -> None:
    """Close an owner in this process that still has the file open (a daemon restarted in-process)."""
    with _OPEN_LOCK:
        ref = _OPEN.get(str(path))
    old = ref() if ref is not None else None
    if old is not None and not old.closed:
        log.info("taking over %s from an earlier sink of this process", path)
        old.close()
