"""/v1/backbones: the timm architectures the server can train, and whether it has their weights."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator

from visiontune_client.resources._base import Resource, params
from visiontune_client.types import Backbone


class Backbones(Resource):
    def list(self, search: str | None = None, limit: int = 20, offset: int = 0) -> list[Backbone]:
        """One page (`limit` at most 100) of the backbones whose name contains `search`."""
        return self._list(Backbone.from_json, "/v1/backbones", search=search, limit=limit, offset=offset)

    def iter(self, search: str | None = None, page_size: int = 100) -> Iterator[Backbone]:
        """Every backbone whose name contains `search`, requested `page_size` at a time."""
        return self._t.iterate(self._pages(search, page_size))

    async def _pages(self, search: str | None, page_size: int) -> AsyncGenerator[Backbone, None]:
        offset = 0
        while True:
            query = params(search=search, limit=page_size, offset=offset)
            page = (await self._t.json("GET", "/v1/backbones", params=query))["data"]
            for raw in page:
                yield Backbone.from_json(raw)
            if len(page) < page_size:
                return
            offset += len(page)
