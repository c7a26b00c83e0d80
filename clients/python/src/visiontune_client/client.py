"""`Client` and `AsyncClient`: the same resources, on a blocking or an asyncio transport."""

from typing import Any, Self

import httpx

from visiontune_client._http import AsyncTransport, SyncTransport, resolve_config
from visiontune_client.resources import Backbones, Datasets, Jobs, Models, Sweeps, Webhooks
from visiontune_client.resources._base import Resource
from visiontune_client.types import Me


class _BaseClient(Resource):
    """What both clients share: the resources, and `me`."""

    def __init__(self, transport: SyncTransport | AsyncTransport):
        super().__init__(transport)
        self.datasets = Datasets(transport)
        self.jobs = Jobs(transport)
        self.models = Models(transport)
        self.sweeps = Sweeps(transport, self.jobs)
        self.backbones = Backbones(transport)
        self.webhooks = Webhooks(transport)

    @property
    def base_url(self) -> str:
        return self._t.config.base_url

    def me(self) -> Me:
        """The calling key, its tenant, the tenant's quotas and usage."""
        return self._call(Me.from_json, "GET", "/v1/me")


class Client(_BaseClient):
    """The VisionTune API. `base_url` defaults to `VISIONTUNE_API_URL` (else http://127.0.0.1:8000),
    `api_key` to `VISIONTUNE_API_KEY`; `timeout` is in seconds; 429, 503 and (for idempotent
    requests) broken connections are retried up to `max_retries` times. `transport`: an httpx
    transport to send through instead of the network (proxies, tests)."""

    _t: SyncTransport

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(SyncTransport(resolve_config(base_url, api_key, timeout, max_retries), transport))

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """`Client` for asyncio (`transport`: an httpx async transport): every method is awaited, and
    `jobs.stream`, `jobs.iter_events` and `backbones.iter` are async iterators."""

    _t: AsyncTransport

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(AsyncTransport(resolve_config(base_url, api_key, timeout, max_retries), transport))

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
