"""An API process's side of the inference process (`app.serving.inference_process`): what it
keeps of each model to decode and preprocess requests itself, and the connections it sends the
pixels over. `Serving` uses `RemoteModels` in place of `ModelCache`, and the two kinds of model
answer the same calls."""

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio.from_thread
import numpy as np
import timm
import torch

from app.core.errors import AppError
from app.ml.backbone import pixel_transform
from app.ml.data import eval_resize
from app.serving import device_decode
from app.serving.device_decode import DeviceUndecodable, EncodedJpeg
from app.serving.inference_process import read_frame, write_frame
from app.serving.predictor import export_may_come


class InferenceUnavailable(AppError):
    status_code = 503
    code = "inference_unavailable"
    headers = {"Retry-After": "1"}


class InferenceFailed(RuntimeError):
    """The inference process answered with an error (it goes on serving)."""


class InferenceClient:
    """Connections to one inference process, kept open between requests: one request in flight on
    each, so concurrent requests each take their own (and the process batches them together)."""

    def __init__(self, path: str):
        self.path = path
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call(self, header: dict, payload: bytes | memoryview = b"") -> tuple[dict, bytes]:
        while True:
            reused = bool(self._idle)
            try:
                reader, writer = self._idle.pop() if reused else await asyncio.open_unix_connection(self.path)
            except OSError as exc:
                raise InferenceUnavailable(
                    "The inference process is not answering (it is starting or being restarted); try again.",
                ) from exc
            try:
                await write_frame(writer, header, payload)
                answer, rows = await read_frame(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                writer.close()
                if reused:
                    continue  # kept from before the process was restarted: a new connection next
                raise InferenceUnavailable("The inference process went away during the request; try again.") from exc
            except BaseException:
                writer.close()  # cancelled mid-request (its deadline): the answer must not reach the next one
                raise
            self._idle.append((reader, writer))
            if answer.get("code") == DeviceUndecodable.code:
                raise DeviceUndecodable(answer["error"])
            if "error" in answer:
                raise InferenceFailed(answer["error"])
            return answer, rows


@dataclass
class RemoteModel:
    """What an API process needs of a model whose forward passes run in the inference process."""

    model_id: str
    directory: Path
    exports: dict[str, Path]
    client: InferenceClient
    transform: Callable  # PIL image -> uint8 CHW pixels: the inference process scales them to [0, 1]
    resize: int
    labels: list[str]
    export_may_come: bool
    decode_steps: list | None  # not None: the inference process can decode this model's JPEGs (device_decode)
    runtime: str = "torch"  # as the inference process last answered

    @property
    def exports_seen(self) -> frozenset[str]:
        return frozenset(self.exports)

    def _header(self, op: str) -> dict:
        return {
            "op": op,
            "model_id": self.model_id,
            "directory": str(self.directory),
            "exports": {name: str(path) for name, path in self.exports.items()},
        }

    async def _rows(self, op: str, images: torch.Tensor | list[EncodedJpeg]) -> tuple[dict, torch.Tensor]:
        if isinstance(images, list):  # JPEGs, end to end, for the inference process to decode
            header = {**self._header(op), "jpegs": [len(image.data) for image in images]}
            payload = b"".join(image.data for image in images)
        else:
            pixels = images.contiguous()
            header, payload = {**self._header(op), "shape": list(pixels.shape)}, pixels.numpy().data
        answer, rows = await self.client.call(header, payload)
        self.runtime = answer["runtime"]
        return answer, torch.from_numpy(np.frombuffer(rows, dtype=np.float32).reshape(answer["shape"]).copy())

    async def load(self) -> None:
        answer, _ = await self.client.call(self._header("load"))
        self.runtime = answer["runtime"]

    async def submit(self, images: torch.Tensor | list[EncodedJpeg]) -> tuple[torch.Tensor, int]:
        answer, probabilities = await self._rows("predict", images)
        return probabilities, answer["batch_size"]

    async def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return (await self._rows("embed", pixels))[1]


class RemoteModels:
    """`ModelCache`'s counterpart: the models this API process has sent to the inference process.
    Each keeps its eval transform and labels, from the model built on PyTorch's meta device (its
    config without its weights), so an entry costs kilobytes and the weights live once, there."""

    def __init__(self, client: InferenceClient, runtime: str):
        self.client, self.runtime = client, runtime
        self._models: dict[str, RemoteModel] = {}
        self._lock = threading.Lock()

    def cached(self, model_id: str) -> RemoteModel | None:
        with self._lock:
            return self._models.get(model_id)

    def get(self, model_id: str, directory: Path, exports: dict[str, Path]) -> RemoteModel:
        """Called in a worker thread of the event loop (`run_in_threadpool`): the inference process
        loads the model now, so that a model that cannot load fails here, as a local load would."""
        if (model := self.cached(model_id)) is not None:
            return model
        with torch.device("meta"):
            skeleton = timm.create_model(f"local-dir:{directory}", pretrained=False)
        transform = pixel_transform(skeleton, uint8=True)
        model = RemoteModel(
            model_id=model_id,
            directory=directory,
            exports=exports,
            client=self.client,
            transform=transform,
            resize=eval_resize(transform).size,
            labels=list(skeleton.pretrained_cfg["label_names"]),
            export_may_come=export_may_come(self.runtime, exports),
            decode_steps=device_decode.tensor_steps(transform),
        )
        anyio.from_thread.run(model.load)
        with self._lock:
            return self._models.setdefault(model_id, model)

    def evict(self, model_id: str) -> None:
        """Forget the model here; the inference process loads it again when a request names an
        export it was loaded without, and `Serving.unload` asks it to drop a deleted one."""
        with self._lock:
            self._models.pop(model_id, None)
