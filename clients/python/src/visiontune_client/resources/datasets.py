"""/v1/datasets: upload (an archive, or a folder packed on the way), follow, audit, delete."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import aclosing
from functools import partial
from pathlib import Path

from visiontune_client._http import Deadline
from visiontune_client.errors import AuditFailedError, DatasetFailedError
from visiontune_client.packing import ProgressCallback, ProgressReader, pack_folder
from visiontune_client.resources._base import Resource, check_failed, ignore, params, q
from visiontune_client.streams import follow
from visiontune_client.types import Audit, Dataset


class Datasets(Resource):
    def upload(
        self, path: str | os.PathLike[str], name: str | None = None, progress: ProgressCallback | None = None
    ) -> Dataset:
        """Upload an archive (.zip, .tar, .tar.gz) or an ImageFolder folder, zipped first into a
        temporary file (`InvalidDatasetError` if it has no class subfolders). `progress(done, total)`
        is called with the bytes packed, then with the bytes uploaded. The dataset is answered
        `processing`: see `wait`."""
        return self._t.run(self._upload(Path(path), name, progress))

    async def _upload(self, path: Path, name: str | None, progress: ProgressCallback | None) -> Dataset:
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {path}")
        packed = path.is_dir()
        archive = await self._t.blocking(partial(pack_folder, path, progress)) if packed else path
        try:
            with archive.open("rb") as file:
                body = ProgressReader(file, progress) if progress else file
                files = [("file", (f"{path.name}.zip" if packed else path.name, body))]
                raw = await self._t.json("POST", "/v1/datasets", files=files, data=params(name=name))
        finally:
            if packed:
                archive.unlink(missing_ok=True)
        return Dataset.from_json(raw)

    def get(self, dataset_id: str) -> Dataset:
        return self._call(Dataset.from_json, "GET", f"/v1/datasets/{q(dataset_id)}")

    def list(self, limit: int = 100, after: str | None = None) -> list[Dataset]:
        """The newest `limit` datasets (at most 1000), or those after the dataset `after`."""
        return self._list(Dataset.from_json, "/v1/datasets", limit=limit, after=after)

    def iter(self, page_size: int = 100) -> Iterator[Dataset]:
        """Every dataset, newest first, `page_size` a request."""
        return self._iter(Dataset.from_json, "/v1/datasets", page_size)

    def delete(self, dataset_id: str) -> None:
        return self._call(ignore, "DELETE", f"/v1/datasets/{q(dataset_id)}")

    def wait(self, dataset_id: str, timeout: float | None = None) -> Dataset:
        """Follow the dataset's event stream until it is processed; the dataset once `ready`, else
        `DatasetFailedError`; `WaitTimeoutError` after `timeout` seconds."""
        return self._t.run(self._wait(dataset_id, timeout))

    async def _wait(self, dataset_id: str, timeout: float | None) -> Dataset:
        path, what = f"/v1/datasets/{q(dataset_id)}", f"dataset {dataset_id}"
        async with aclosing(follow(self._t, path, Deadline.after(timeout), what)) as events:
            async for _ in events:
                pass
        dataset = await self._fetch(Dataset.from_json, "GET", path)
        return check_failed(dataset, DatasetFailedError, what)

    def audit(
        self, dataset_id: str, backbone: str | None = None, wait: bool = True, timeout: float | None = None
    ) -> Audit:
        """The data audit with `backbone`'s features (the server's default when None): asked for on
        the first call, computed by a worker; `wait` polls until it is ready (`AuditFailedError`)."""
        return self._t.run(self._audit(dataset_id, backbone, wait, timeout))

    async def _audit(self, dataset_id: str, backbone: str | None, wait: bool, timeout: float | None) -> Audit:
        path, what = f"/v1/datasets/{q(dataset_id)}/audit", f"audit of dataset {dataset_id}"
        fetch = partial(self._fetch, Audit.from_json, "GET", path, params=params(backbone=backbone))
        audit = await fetch()
        if wait:
            audit = await self._poll(fetch, audit, Deadline.after(timeout), what)
        return check_failed(audit, AuditFailedError, what)
