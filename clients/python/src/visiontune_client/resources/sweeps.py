"""/v1/sweeps: the same dataset on several backbones (linear probes), ranked; promote the winner."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from visiontune_client._http import Transport
from visiontune_client.resources._base import Resource, params, q
from visiontune_client.resources.jobs import Jobs
from visiontune_client.types import Job, Sweep


class Sweeps(Resource):
    def __init__(self, transport: Transport, jobs: Jobs):
        super().__init__(transport)
        self._jobs = jobs

    def create(self, dataset_id: str, backbones: Sequence[str], seed: int | None = None) -> Sweep:
        body = params(dataset_id=dataset_id, backbones=list(backbones), seed=seed)
        return self._call(Sweep.from_json, "POST", "/v1/sweeps", json=body)

    def get(self, sweep_id: str) -> Sweep:
        return self._call(Sweep.from_json, "GET", f"/v1/sweeps/{q(sweep_id)}")

    def list(self, limit: int = 100, after: str | None = None) -> list[Sweep]:
        """The newest `limit` sweeps (at most 1000), or those after the sweep `after`."""
        return self._list(Sweep.from_json, "/v1/sweeps", limit=limit, after=after)

    def iter(self, page_size: int = 100) -> Iterator[Sweep]:
        """Every sweep, newest first, `page_size` a request."""
        return self._iter(Sweep.from_json, "/v1/sweeps", page_size)

    def promote(
        self,
        sweep_id: str,
        backbone: str,
        strategy: str | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> Job:
        """Train `backbone` of the sweep's table for real: the new job."""
        body = params(backbone=backbone, strategy=strategy, hyperparameters=hyperparameters, seed=seed)
        path = f"/v1/sweeps/{q(sweep_id)}/promote"
        return self._call(lambda raw: Job.from_json(raw, self._jobs), "POST", path, json=body)
