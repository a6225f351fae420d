"""Request bodies are refused while they stream in, not after being buffered whole."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import Request

from serving.bodies import read_limited
from serving.problems import Problem


def request(chunk: bytes, pulled: list[int], headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    """A request whose body is an endless stream of `chunk`s; `pulled` counts the chunks read."""

    async def receive() -> dict:
        pulled.append(1)
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers or [], "query_string": b""}
    return Request(scope, receive)


def test_an_endless_chunked_body_is_refused_at_the_first_chunk_over_the_limit() -> None:
    pulled: list[int] = []
    with pytest.raises(Problem) as refused:
        asyncio.run(read_limited(request(b"x" * 1000, pulled), 10_000, "too big"))
    assert refused.value.status == 413
    assert len(pulled) == 11  # 11 000 bytes read: one chunk past the limit, never the (endless) rest


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    pulled: list[int] = []
    with pytest.raises(Problem):
        asyncio.run(read_limited(request(b"x", pulled, [(b"content-length", b"20000")]), 10_000, "too big"))
    assert pulled == []
