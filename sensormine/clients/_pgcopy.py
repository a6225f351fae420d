"""PostgreSQL's binary COPY format, written directly (https://www.postgresql.org/docs/current/sql-copy.html).

Internal to the clients package: the rest of the platform writes through `hotstore.CopyBatch` and
`HotStoreWriter` (the layers contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

import struct

PG_EPOCH_US = 946_684_800_000_000
"""2000-01-01 UTC in Unix microseconds: binary timestamps count from there."""
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header-extension length
COPY_TRAILER = b"\xff\xff"
ROW_TAIL = struct.Struct(">qidihiq")
"""The fixed-width end of a row: ts | len, value | len, quality | len, ingest_ts (ts's length is in the prefix)."""
_LEN = struct.Struct(">i")


def series_prefix(tenant_id: str, device_id: str, metric: str) -> bytes:
    """Start of every binary COPY row of one series: field count, the three key texts, and ts's length."""
    out = bytearray(b"\x00\x07")
    for text in (tenant_id, device_id, metric):
        raw = text.encode()
        out += _LEN.pack(len(raw))
        out += raw
    out += b"\x00\x00\x00\x08"
    return bytes(out)
