"""Transport: configuration, retries, error mapping, and the two transports the clients run on.

The SDK's logic is written once, as coroutines over a few transport primitives (send a request,
read a response's lines or chunks, release it, sleep, call blocking file work). `AsyncTransport`'s
primitives are httpx.AsyncClient's. `SyncTransport`'s are httpx.Client's blocking calls inside
coroutines that never suspend, so the same coroutines finish on their first step, without an
event loop (`finish`).
"""

import asyncio
import os
import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from visiontune_client.errors import (
    STATUS_ERRORS,
    APIConnectionError,
    APIError,
    APITimeoutError,
    MissingAPIKeyError,
    WaitTimeoutError,
)

VERSION = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "VISIONTUNE_API_URL"
KEY_ENV = "VISIONTUNE_API_KEY"

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({429, 503})  # refused before anything was done: safe to repeat for any method
# Broken or refused connections; a read timeout is not among them (the server is there, only slow).
RETRY_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout, httpx.PoolTimeout)
BACKOFF_START = 0.5
BACKOFF_CAP = 8.0

T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    base_url: str
    api_key: str
    timeout: float
    max_retries: int


def resolve_config(base_url: str | None, api_key: str | None, timeout: float, max_retries: int) -> Config:
    """Arguments first, then `VISIONTUNE_API_URL` / `VISIONTUNE_API_KEY`; no key at all is an error."""
    key = api_key or os.environ.get(KEY_ENV)
    if not key:
        raise MissingAPIKeyError(f"no API key: pass one (api_key=..., or --api-key on the command line) or set {KEY_ENV}")
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
    return Config(url.rstrip("/"), key, timeout, max_retries)


@dataclass(frozen=True)
class Deadline:
    """When a `wait` gives up; `timeout=None` never does."""

    timeout: float | None
    at: float | None

    @classmethod
    def after(cls, timeout: float | None) -> "Deadline":
        return cls(timeout, None if timeout is None else time.monotonic() + timeout)

    def remaining(self) -> float | None:
        return None if self.at is None else max(self.at - time.monotonic(), 0.0)

    def check(self, what: str) -> None:
        if self.at is not None and time.monotonic() >= self.at:
            raise WaitTimeoutError(f"{what} did not finish within {self.timeout:g} s")


# -- retries and errors ---------------------------------------------------------------------------


def backoff(attempt: int) -> float:
    """0.5 s doubling per attempt up to 8 s, less a random part of up to half of it."""
    return min(BACKOFF_START * 2**attempt, BACKOFF_CAP) * random.uniform(0.5, 1.0)


def retry_delay(response: httpx.Response, attempt: int) -> float:
    """The server's `Retry-After` (in seconds) when it gives one, else `backoff`."""
    try:
        return max(float(response.headers["retry-after"]), 0.0)
    except (KeyError, ValueError):
        return backoff(attempt)


def error_from_response(response: httpx.Response) -> APIError:
    """The `APIError` subclass of the status, from the `{"error": {code, message, details}}` envelope."""
    try:
        error = response.json()["error"]
        code, message, details = str(error["code"]), str(error["message"]), list(error.get("details") or [])
    except (ValueError, KeyError, TypeError):  # not the API's envelope (e.g. a proxy's error page)
        code = response.reason_phrase.lower().replace(" ", "_") or "http_error"
        message, details = response.text.strip()[:200] or response.reason_phrase, []
    cls = STATUS_ERRORS.get(response.status_code, APIError)
    return cls(response.status_code, code, message, details, response.headers.get("x-request-id"))


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    try:
        url: str | None = str(exc.request.url)
    except RuntimeError:  # raised without its request
        url = None
    reason = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)) or type(exc).__name__
    reason = reason[:1].lower() + reason[1:]
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return APITimeoutError(f"no answer from {url} in time: {reason}", url)
    return APIConnectionError(f"cannot reach {url}: {reason}", url)


@contextmanager
def transport_errors() -> Iterator[None]:
    """httpx's transport errors, raised as `APIConnectionError`."""
    try:
        yield
    except httpx.TransportError as exc:
        raise connection_error(exc) from exc


def finish(awaitable: Awaitable[T]) -> T:
    """The value of an awaitable of the sync transport, which never suspends: it ends on its first step."""
    steps = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as stop:
        return stop.value
    steps.close()
    raise RuntimeError("the blocking transport was asked to suspend")


# -- the transports -------------------------------------------------------------------------------


class Transport(ABC):
    """Requests with retries, on the primitives of a subclass."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(self, config: Config):
        self.config = config

    def _client_options(self) -> dict[str, Any]:
        return {
            "base_url": self.config.base_url,
            "headers": {"Authorization": f"Bearer {self.config.api_key}", "User-Agent": f"visiontune-client/{VERSION}"},
            "timeout": self.config.timeout,
        }

    async def request(
        self, method: str, path: str, *, stream: bool = False, read_timeout: float | None = None, **options: Any
    ) -> httpx.Response:
        """One request, repeated up to `max_retries` times on 429 and 503 and, when idempotent, on a
        broken connection; an error status raises its `APIError`. `stream`: the body is left to
        read (`lines`, `chunks`), then `release`. `read_timeout`: at most the client's timeout."""
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if read_timeout is not None:
            timeout = httpx.Timeout(self.config.timeout, read=min(read_timeout, self.config.timeout))
        attempt = 0
        while True:
            try:
                response = await self.send(self._http.build_request(method, path, timeout=timeout, **options), stream)
            except RETRY_ERRORS:
                if method not in IDEMPOTENT or attempt >= self.config.max_retries:
                    raise
                await self.sleep(backoff(attempt))
            else:
                if response.status_code in RETRY_STATUSES and attempt < self.config.max_retries:
                    await self.release(response)
                    await self.sleep(retry_delay(response, attempt))
                elif response.is_error:
                    await self.read(response)
                    await self.release(response)
                    raise error_from_response(response)
                else:
                    return response
            attempt += 1

    async def json(self, method: str, path: str, **options: Any) -> Any:
        """The request's JSON answer (None for an empty body, e.g. 204)."""
        response = await self.request(method, path, **options)
        return response.json() if response.content else None

    @abstractmethod
    async def send(self, request: httpx.Request, stream: bool) -> httpx.Response: ...

    @abstractmethod
    async def read(self, response: httpx.Response) -> None: ...

    @abstractmethod
    def lines(self, response: httpx.Response) -> AsyncIterator[str]: ...

    @abstractmethod
    def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def release(self, response: httpx.Response) -> None: ...

    @abstractmethod
    async def sleep(self, seconds: float) -> None: ...

    @abstractmethod
    async def blocking(self, fn: Callable[[], T]) -> T:
        """`fn()`, file work; off the event loop where there is one."""

    @abstractmethod
    def run(self, coroutine: Awaitable[T]) -> Any:
        """The coroutine's value (the async transport: an awaitable of it)."""

    @abstractmethod
    def iterate(self, items: AsyncGenerator[T, None]) -> Any:
        """The items (the async transport: as an async iterator)."""


class SyncTransport(Transport):
    _http: httpx.Client

    def __init__(self, config: Config, transport: httpx.BaseTransport | None = None):
        super().__init__(config)
        self._http = httpx.Client(**self._client_options(), transport=transport)

    def close(self) -> None:
        self._http.close()

    async def send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        return self._http.send(request, stream=stream)

    async def read(self, response: httpx.Response) -> None:
        response.read()

    async def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        for line in response.iter_lines():
            yield line

    async def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        for chunk in response.iter_bytes():
            yield chunk

    async def release(self, response: httpx.Response) -> None:
        response.close()

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def blocking(self, fn: Callable[[], T]) -> T:
        return fn()

    def run(self, coroutine: Awaitable[T]) -> T:
        with transport_errors():
            return finish(coroutine)

    def iterate(self, items: AsyncGenerator[T, None]) -> Iterator[T]:
        with transport_errors():
            try:
                while True:
                    try:
                        item = finish(anext(items))
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                finish(items.aclose())


class AsyncTransport(Transport):
    _http: httpx.AsyncClient

    def __init__(self, config: Config, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(config)
        self._http = httpx.AsyncClient(**self._client_options(), transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        return await self._http.send(request, stream=stream)

    async def read(self, response: httpx.Response) -> None:
        await response.aread()

    def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        return response.aiter_lines()

    def chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        return response.aiter_bytes()

    async def release(self, response: httpx.Response) -> None:
        await response.aclose()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def blocking(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(fn)

    async def run(self, coroutine: Awaitable[T]) -> T:
        with transport_errors():
            return await coroutine

    async def iterate(self, items: AsyncGenerator[T, None]) -> AsyncIterator[T]:
        with transport_errors():
            async with aclosing(items):
                async for item in items:
                    yield item
