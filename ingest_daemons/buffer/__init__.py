"""Store-and-forward: a bounded SQLite buffer in front of a ReadingSink, for when its link is down.

`BufferedSink` wraps the sink a daemon writes to (Kafka, or the in-process hot-store path) and is a
`ReadingSink` itself. While the inner sink delivers, every message passes straight through and the
caller's `done` fires on the inner's confirmation; the disk is not touched. When a delivery fails
(the inner reports it, raises a link error, or stays silent past a backstop timeout), the sink
switches to storing: that message and every later one are appended to a SQLite database (WAL mode,
synchronous=FULL, group commit) and `done` fires once they are committed there, so the daemon can
acknowledge its source. A worker thread drains the database in arrival order through the inner
sink, deleting rows only once the inner confirms them. Once every buffered row has been handed to
the inner and confirmed batches show the link works, what still waits for the disk is handed to the
inner right behind them and the sink is back to pass-through. Nothing newer overtakes buffered data:
while anything is buffered, new data is buffered (or handed over) behind it. See
docs/store-and-forward.md for the decisions and their limits.

Modules: `journal` (the SQLite file: schema, append, read, delete, compact, the bound, the file
lock), `sink` (`BufferedSink`, the state machine) and `wiring` (`make_buffered_sink`: the Kafka or
direct inner sink and the buffer's file and settings).
"""

from ingest_daemons.buffer.journal import BufferInUse, DropPolicy
from ingest_daemons.buffer.sink import (
    DEFAULT_DELIVERY_TIMEOUT_S,
    DEFAULT_LINK_TIMEOUT_S,
    DEFAULT_MAX_BYTES,
    LINK_ERRORS,
    BufferedSink,
    BufferStats,
)
from ingest_daemons.buffer.wiring import buffer_path, make_buffered_sink

__all__ = [
    "DEFAULT_DELIVERY_TIMEOUT_S",
    "DEFAULT_LINK_TIMEOUT_S",
    "DEFAULT_MAX_BYTES",
    "LINK_ERRORS",
    "BufferInUse",
    "BufferStats",
    "BufferedSink",
    "DropPolicy",
    "buffer_path",
    "make_buffered_sink",
]
