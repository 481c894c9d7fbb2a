"""OpenAI's cursor paging, shared by the list routes: `after` names the row a page starts after,
`limit` its size; the repository fetches `limit + 1` rows and `list_page` (tuneforge/api/schemas.py)
turns the extra one into `has_more`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Query

from tuneforge.api.errors import BadRequest

T = TypeVar("T")

After = Annotated[str | None, Query(description="An id: the page starts after it.")]


def cursor_row(after: str | None, find: Callable[[str], T | None], no_such: str) -> T | None:
    """The row named by `after` (None without `after`), looked up with `find`; a 400 naming
    `after` ("`no_such`: <id>") when there is no such row."""
    if after is None:
        return None
    row = find(after)
    if row is None:
        raise BadRequest(f"{no_such}: {after}", param="after")
    return row
