"""/v1/models: the registry (versions, aliases, downloads, exports) and predictions. A `ref` is a
model id, `name@version` or `name@alias` (e.g. `pets@production`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from visiontune_client._http import Deadline
from visiontune_client.errors import ExportFailedError
from visiontune_client.resources._base import Resource, check_failed, ignore, params, q
from visiontune_client.types import Alias, Embeddings, Export, Model, Predictions

T = TypeVar("T")
Image: TypeAlias = str | os.PathLike[str] | bytes  # a file's path, or its bytes
Images: TypeAlias = Image | Sequence[Image]


def image_files(images: Images) -> list[tuple[str, tuple[str, bytes]]]:
    """The multipart `files` of a predict or embed request; bytes are named image-<index>."""
    items = [images] if isinstance(images, (str, bytes, os.PathLike)) else list(images)
    files = []
    for index, image in enumerate(items):
        if isinstance(image, bytes):
            files.append(("files", (f"image-{index}", image)))
        else:
            path = Path(image)
            files.append(("files", (path.name, path.read_bytes())))
    return files


class Models(Resource):
    def get(self, ref: str) -> Model:
        return self._call(Model.from_json, "GET", f"/v1/models/{q(ref)}")

    def list(self, limit: int = 100, after: str | None = None) -> list[Model]:
        """The newest `limit` models (at most 1000), or those after the model `after`."""
        return self._list(Model.from_json, "/v1/models", limit=limit, after=after)

    def iter(self, page_size: int = 100) -> Iterator[Model]:
        """Every model, newest first, `page_size` a request."""
        return self._iter(Model.from_json, "/v1/models", page_size)

    def delete(self, ref: str) -> None:
        return self._call(ignore, "DELETE", f"/v1/models/{q(ref)}")

    def predict(
        self, ref: str, images: Images, top_k: int | None = None, threshold: float | None = None
    ) -> Predictions:
        """Labels of one image or several (paths or bytes), best first, `top_k` each; an image whose
        best score is below `threshold` gets None."""
        return self._t.run(
            self._images(Predictions.from_json, ref, "predict", images, top_k=top_k, threshold=threshold)
        )

    def embed(self, ref: str, images: Images) -> Embeddings:
        """The pooled features (the classifier's input) of each image."""
        return self._t.run(self._images(Embeddings.from_json, ref, "embed", images))

    async def _images(self, parse: Callable[[Any], T], ref: str, action: str, images: Images, **query: Any) -> T:
        files = await self._t.blocking(partial(image_files, images))
        path = f"/v1/models/{q(ref)}/{action}"
        return await self._fetch(parse, "POST", path, files=files, params=params(**query))

    def export(self, ref: str, format: str = "onnx", wait: bool = True, timeout: float | None = None) -> Export:
        """Ask for an export (answered at once if the model has it already); `wait` polls until it is
        ready (`ExportFailedError` if its conversion or parity check failed)."""
        return self._t.run(self._export(ref, format, wait, timeout))

    async def _export(self, ref: str, format: str, wait: bool, timeout: float | None) -> Export:
        path, what = f"/v1/models/{q(ref)}/exports", f"{format} export of model {ref}"
        export = await self._fetch(Export.from_json, "POST", path, json={"format": format})
        if wait:
            fetch = partial(self._fetch, Export.from_json, "GET", f"{path}/{q(format)}")
            export = await self._poll(fetch, export, Deadline.after(timeout), what)
        return check_failed(export, ExportFailedError, what)

    def download(self, ref: str, path: str | os.PathLike[str]) -> Path:
        """Save the model's artifact (a zip: weights, classes, preprocessing) as the file `path`."""
        return self._t.run(self._download(f"/v1/models/{q(ref)}/download", path))

    def download_export(self, ref: str, format: str, path: str | os.PathLike[str]) -> Path:
        """Save a ready export (e.g. the .onnx file) as the file `path`."""
        return self._t.run(self._download(f"/v1/models/{q(ref)}/exports/{q(format)}/download", path))

    def set_alias(self, name: str, alias: str, target: int | str) -> Alias:
        """Point `name@alias` at a version: `target` is the version number, or a ref of that model."""
        return self._t.run(self._set_alias(name, alias, target))

    async def _set_alias(self, name: str, alias: str, target: int | str) -> Alias:
        version = target
        if isinstance(target, str):
            model = await self._fetch(Model.from_json, "GET", f"/v1/models/{q(target)}")
            if model.name != name:
                raise ValueError(f"{target} is {model.name}@{model.version}, not a version of {name}")
            version = model.version
        path = f"/v1/models/{q(name)}/aliases/{q(alias)}"
        return await self._fetch(Alias.from_json, "PUT", path, json={"version": version})

    def delete_alias(self, name: str, alias: str) -> None:
        return self._call(ignore, "DELETE", f"/v1/models/{q(name)}/aliases/{q(alias)}")
