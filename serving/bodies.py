"""Request bodies read with a size limit enforced while they stream in (never buffered whole first)."""

from __future__ import annotations

from fastapi import Request

from serving.problems import Problem


async def read_limited(request: Request, max_bytes: int, too_big: str) -> bytes:
    """The request body, or a 413 problem (`too_big`) as soon as more than `max_bytes` have arrived.

    A declared Content-Length over the limit is refused before reading; a chunked body is refused at
    the first chunk that crosses it, so a client cannot make the server hold more than the limit.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise Problem(413, too_big)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise Problem(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)
