"""Serving: from a prediction request's body to its answer.

Reads the images under the request limits, finds the model in this process's cache (loading it
on first use, in PyTorch or onnxruntime: `app.serving.predictor`), decodes and preprocesses on a
bounded number of threads, and runs the forward pass through the model's micro-batcher
(`app.serving.batcher`). One `Serving` per API process, made in the app's lifespan.
"""

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio
import torch
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from app.core.config import Settings
from app.core.errors import DeadlineExceeded, Invalid, NotFound
from app.core.storage import capped_body, parse_multipart
from app.db.tables import Model
from app.models.service import local_artifact, local_exports, model_exists, ready_exports
from app.serving import predictor
from app.serving.device_decode import DeviceUndecodable, EncodedJpeg
from app.serving.predictor import LoadedModel, ModelCache
from app.serving.remote import InferenceClient, InferenceFailed, InferenceUnavailable, RemoteModel, RemoteModels
from app.serving.schemas import EmbeddingResponse, ImagesBody, PredictionResponse

EXPORT_CHECK_SECONDS = 5.0

Images = list[tuple[str, bytes]]  # (filename, file bytes)
Body = TypeVar("Body", bound=BaseModel)


@dataclass
class Answer(Generic[Body]):
    body: Body
    headers: dict[str, str] = field(default_factory=dict)


async def read_images(request: Request, settings: Settings) -> Images:
    """Images from a multipart body (field `files`, one or more), JSON (base64), or one image as
    the raw body (`Content-Type: image/jpeg` etc.: no multipart parsing, the cheapest to serve),
    within limits."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("image/"):
        body = b"".join([chunk async for chunk in capped_body(request, settings.max_predict_bytes)])
        if not body:
            raise Invalid("The request body is empty; send the image's bytes.", code="missing_file")
        return [("image", body)]
    if content_type.startswith("application/json"):
        body = b"".join([chunk async for chunk in capped_body(request, settings.max_predict_bytes)])
        try:
            images = [(image.filename, image.data) for image in ImagesBody.model_validate_json(body).images]
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise Invalid(f"Invalid JSON body at {where}: {first['msg']}", code="validation_error") from exc
    else:
        form = await parse_multipart(request, settings.max_predict_bytes, settings.max_predict_files)
        try:
            uploads = [item for key, item in form.multi_items() if key == "files" and isinstance(item, UploadFile)]
            images = [(upload.filename or f"file{i}", await upload.read()) for i, upload in enumerate(uploads)]
        finally:
            await form.close()
        if not images:
            raise Invalid("Send one or more images in the multipart field 'files'.", code="missing_file")
    if len(images) > settings.max_predict_files:
        raise Invalid(f"{len(images)} images sent; at most {settings.max_predict_files} per request.", code="too_many_files")
    return images


class Serving:
    def __init__(self, settings: Settings):
        self.settings = settings
        # With inference processes (`visiontune serve` on a GPU: app/serving/inference_process.py),
        # this process decodes and preprocesses, and they run the forward passes.
        self.inference = [InferenceClient(path) for path in settings.inference_sockets.split(",") if path]
        if self.inference:
            self.cache = RemoteModels(self.inference[os.getpid() % len(self.inference)], settings.serving_runtime)
        else:
            self.cache = ModelCache.from_settings(settings)
        self._inference_on_gpu = bool(self.inference) and predictor.serving_device(settings.serving_device) == "cuda"
        # Decoding runs on at most one thread per core, not on all 40 of FastAPI's shared pool: each
        # holds the GIL between its Pillow calls, and the event loop and the forward-pass thread
        # queue behind every one of them. With several API processes (`visiontune serve`), each
        # takes its share of the cores, for decoding and forward passes alike. (Made here, in the
        # lifespan: a limiter belongs to the event loop that first waits on it.)
        threads = max(1, len(os.sched_getaffinity(0)) // settings.api_workers)
        if settings.api_workers > 1:
            torch.set_num_threads(threads)
        self.preprocess_limiter = anyio.CapacityLimiter(threads)
        self._export_checked: dict[str, float] = {}

    @property
    def decodes_on_device(self) -> bool:
        """Whether JPEGs go to the model's micro-batcher undecoded (`VISIONTUNE_SERVING_DECODE`). `auto`
        does so where an inference process runs the forward passes on a GPU. There nvjpeg decodes in
        batches, 4.5x faster than 16 CPU threads with Pillow (H100 machine, bench/SPEED.md), and an
        API process then spends 1.6 ms of CPU per prediction instead of 7.3-9.0 ms (2-core CPU)."""
        decode = self.settings.serving_decode
        return decode == "device" or (decode == "auto" and self._inference_on_gpu)

    async def predict(self, model: Model, images: Images, top_k: int | None, threshold: float | None) -> Answer:
        """Top-k labels with calibrated probabilities per image (None under `threshold`)."""
        started = time.perf_counter()
        num_classes = len(model.classes)
        top_k = top_k or min(5, num_classes)
        if top_k > num_classes:
            raise Invalid(f"top_k={top_k} but the model has {num_classes} classes.", code="top_k_too_large")
        async with self._deadline():
            loaded = await self._model(model)
            batch = await self._preprocess(loaded, images, jpegs=self.decodes_on_device)
            try:
                results, batch_size = await predictor.predict(loaded, batch, top_k, threshold)
            except DeviceUndecodable:  # a JPEG the device's decoder refused: Pillow decodes it, or says why not
                batch = await self._preprocess(loaded, images)
                results, batch_size = await predictor.predict(loaded, batch, top_k, threshold)
        body = PredictionResponse(
            model_id=model.id,
            predictions=[
                {"filename": name, "labels": None if labels is None else [{"label": l, "score": s} for l, s in labels]}
                for (name, _), labels in zip(images, results, strict=True)
            ],
        )
        return Answer(body, {**_timing(started), "X-Batch-Size": str(batch_size), "X-Runtime": loaded.runtime})

    async def embed(self, model: Model, images: Images) -> Answer:
        """The pooled features (the classifier's input) of each image."""
        started = time.perf_counter()
        async with self._deadline():
            loaded = await self._model(model)
            vectors = await loaded.embed(await self._preprocess(loaded, images))
        body = EmbeddingResponse(
            model_id=model.id,
            dimensions=vectors.shape[1],
            embeddings=[{"filename": name, "embedding": v} for (name, _), v in zip(images, vectors.tolist(), strict=True)],
        )
        return Answer(body, _timing(started))

    def _load(self, model_id: str) -> LoadedModel | RemoteModel:
        try:
            directory = local_artifact(self.settings, model_id)  # fetched from the object store on first use
            return self.cache.get(model_id, directory, local_exports(self.settings, model_id))
        except Exception:
            # Deleted since this request found its row (the row goes first, then the files, which
            # may vanish under the load): that is a 404, not a server error.
            if not model_exists(model_id):
                raise NotFound(f"Model '{model_id}' was deleted.", code="model_not_found") from None
            raise

    async def _export_appeared(self, model_id: str, seen: frozenset[str]) -> bool:
        """Whether a worker has finished an export the model was loaded without: asked of the
        database at most every EXPORT_CHECK_SECONDS per model, not on every request."""
        now = time.monotonic()
        if now - self._export_checked.get(model_id, 0.0) < EXPORT_CHECK_SECONDS:
            return False
        self._export_checked[model_id] = now
        return bool(await run_in_threadpool(ready_exports, model_id) - seen)

    def unload(self, model_id: str) -> None:
        """Drop a deleted model from this process's cache, and from the inference processes'.
        Called from a worker thread of the event loop (the delete route)."""
        self.cache.evict(model_id)
        for client in self.inference:
            with contextlib.suppress(InferenceUnavailable, InferenceFailed):  # a restarted one never had it
                anyio.from_thread.run(client.call, {"op": "evict", "model_id": model_id})

    @asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """Every prediction answers within `predict_timeout_s`: 504 rather than a request left hanging."""
        try:
            async with asyncio.timeout(self.settings.predict_timeout_s):
                yield
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"The prediction was not ready within {self.settings.predict_timeout_s:g} s; try again.",
                code="prediction_timeout",
            ) from exc

    async def _model(self, model: Model) -> LoadedModel | RemoteModel:
        # `cached` never waits, so the event loop may call it; a load goes to a thread.
        loaded = self.cache.cached(model.id)
        if loaded is not None and loaded.export_may_come and await self._export_appeared(model.id, loaded.exports_seen):
            self.cache.evict(model.id)  # load it again to choose its runtime; requests holding it still get answers
            loaded = None
        if loaded is None:
            loaded = await run_in_threadpool(self._load, model.id)
        return loaded

    async def _preprocess(
        self, loaded: LoadedModel | RemoteModel, images: Images, jpegs: bool = False
    ) -> torch.Tensor | list[EncodedJpeg]:
        return await anyio.to_thread.run_sync(
            predictor.preprocess, loaded, images, self.settings.max_image_pixels, jpegs, limiter=self.preprocess_limiter
        )


def _timing(started: float) -> dict[str, str]:
    return {"Server-Timing": f"inference;dur={(time.perf_counter() - started) * 1000:.1f}"}
