"""The query of every newest-first list endpoint: `limit`, and `after` for the next page."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query


@dataclass(frozen=True)
class Page:
    limit: int
    after: str | None  # the id of the last item of the previous page


def _page(
    limit: Annotated[int, Query(ge=1, le=1000, description="Items per page, newest first.")] = 100,
    after: Annotated[
        str | None,
        Query(description="The id of the last item of the previous page: this page starts after it. Pages are "
              "stable while new items are added."),
    ] = None,
) -> Page:  # fmt: skip
    return Page(limit, after)


PageDep = Annotated[Page, Depends(_page)]
