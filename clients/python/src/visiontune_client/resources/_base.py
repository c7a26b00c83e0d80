"""What every resource shares: running its coroutines on the client's transport, and polling."""

import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from visiontune_client._http import Deadline, Transport
from visiontune_client.errors import OperationFailedError
from visiontune_client.types import ErrorInfo

T = TypeVar("T")
S = TypeVar("S", bound="HasStatus")

POLL_START = 0.5
POLL_CAP = 5.0


class HasStatus(Protocol):
    @property
    def status(self) -> str: ...

    @property
    def error(self) -> ErrorInfo | None: ...


def ignore(_: Any) -> None:
    return None


def q(segment: str | int) -> str:
    """A path segment, percent-encoded (`name@alias` model refs keep their @)."""
    return quote(str(segment), safe="@")


def params(**values: Any) -> dict[str, Any]:
    """Query parameters or body fields, without those not given (None)."""
    return {name: value for name, value in values.items() if value is not None}


def check_failed(item: S, error: type[OperationFailedError], what: str) -> S:
    """`item`, unless its status is `failed`: then `error` with the item's own error code and message."""
    if item.status == "failed":
        info = item.error
        code, message = (info.code, info.message) if info else ("failed", "no reason given")
        raise error(f"{what} failed", code, message, item)
    return item


class Resource:
    """One part of the API. Its methods run coroutines on the client's transport: with `Client`
    they return the value, with `AsyncClient` an awaitable of it (and async iterators for iterators)."""

    def __init__(self, transport: Transport):
        self._t = transport

    async def _fetch(self, parse: Callable[[Any], T], method: str, path: str, **options: Any) -> T:
        return parse(await self._t.json(method, path, **options))

    def _call(self, parse: Callable[[Any], T], method: str, path: str, **options: Any) -> T:
        """One request, its JSON answer given to `parse`."""
        return self._t.run(self._fetch(parse, method, path, **options))

    def _list(self, parse: Callable[[Mapping[str, Any]], T], path: str, **query: Any) -> list[T]:
        """A list endpoint's `data`, each item given to `parse`."""
        return self._call(lambda body: [parse(item) for item in body["data"]], "GET", path, params=params(**query))

    def _iter(self, parse: Callable[[Mapping[str, Any]], T], path: str, page_size: int) -> Any:
        """Every item of a newest-first list endpoint, `page_size` a request, each page starting
        `after` the last item of the one before (pages stay stable while items are added)."""
        return self._t.iterate(self._newest_first(parse, path, page_size))

    async def _newest_first(
        self, parse: Callable[[Mapping[str, Any]], T], path: str, page_size: int
    ) -> AsyncGenerator[T, None]:
        after = None
        while True:
            page = (await self._t.json("GET", path, params=params(limit=page_size, after=after)))["data"]
            for raw in page:
                yield parse(raw)
            if len(page) < page_size:
                return
            after = page[-1]["id"]

    async def _download(self, path: str, destination: str | os.PathLike[str]) -> Path:
        """Stream `path`'s body into the file `destination` (written whole or not at all)."""
        target = Path(destination)
        partial = target.with_name(target.name + ".part")
        response = await self._t.request("GET", path, stream=True)
        try:
            with partial.open("wb") as out:
                async for chunk in self._t.chunks(response):
                    out.write(chunk)
            partial.replace(target)
        finally:
            await self._t.release(response)
            partial.unlink(missing_ok=True)
        return target

    async def _poll(self, fetch: Callable[[], Awaitable[S]], current: S, deadline: Deadline, what: str) -> S:
        """Fetch again, with growing pauses, while `current` is `processing`."""
        delay = POLL_START
        while current.status == "processing":
            deadline.check(what)
            remaining = deadline.remaining()
            await self._t.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, POLL_CAP)
            current = await fetch()
        return current
