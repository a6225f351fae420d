"""Cursor pagination for every list that can grow: `?limit=&cursor=` in, `{items, next_cursor}` out.

A cursor is opaque to clients (URL-safe base64 of the last item's sort key); pass `next_cursor` back
as `cursor` to get the next page, until it is null.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

from serving.problems import Problem

T = TypeVar("T")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class Page(BaseModel, Generic[T]):
    """One page of a list; `next_cursor` is null on the last page."""

    items: list[T]
    next_cursor: str | None = None


class PageParams(BaseModel):
    """Where a page starts and how long it is."""

    limit: int
    after: Any = None  # the decoded sort key of the previous page's last item

    def page(self, items: list[Any], key: Any) -> dict[str, Any]:
        """`items` fetched with limit + 1, as a page: the extra item only tells that another page exists."""
        more = len(items) > self.limit
        items = items[: self.limit]
        return {"items": items, "next_cursor": encode_cursor(key(items[-1])) if more and items else None}


def encode_cursor(value: Any) -> str:
    """An opaque cursor for a sort key (JSON-serialisable)."""
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Any:
    """The sort key inside a cursor; a 422 problem for one that is not ours."""
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise Problem(422, "the cursor is invalid; pass back next_cursor from the previous page unchanged") from None


def page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page")] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> PageParams:
    """The page a list request asks for."""
    return PageParams(limit=limit, after=decode_cursor(cursor) if cursor else None)


PageDep = Annotated[PageParams, Depends(page_params)]
