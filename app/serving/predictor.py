"""Loading trained models for prediction and running them.

Models are loaded from their artifact exactly as a timm user would (`local-dir:`), with the eval
preprocessing resolved from that artifact's own config and the calibration temperature stored
beside it. Decoding and forward passes run in threads, never on the event loop.
"""

import asyncio
import contextlib
import ctypes
import gc
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config

from app.core.errors import Invalid, UnsupportedMedia
from app.ml.backbone import load_artifact
from app.ml.export import read_temperature
from app.serving.batcher import MicroBatcher

DECODABLE_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    transform: Callable
    labels: list[str]
    temperature: float  # fitted on validation: softmax(logits / temperature) is calibrated
    nbytes: int
    batcher: MicroBatcher

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(batch.contiguous(memory_format=torch.channels_last))

    def embeddings(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            features = self.model.forward_features(batch.contiguous(memory_format=torch.channels_last))
            return self.model.forward_head(features, pre_logits=True)


class ModelCache:
    """Loaded models of one API process, least recently used evicted past `max_bytes` of weights.

    Concurrent first requests for a model load it once; the model in use is never evicted by its
    own load, so a single model larger than the budget still serves.
    """

    def __init__(self, max_bytes: int, max_batch_size: int, max_wait_ms: float):
        self.max_bytes, self.max_batch_size, self.max_wait_ms = max_bytes, max_batch_size, max_wait_ms
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self._models.values())

    def get(self, model_id: str, directory: Path) -> LoadedModel:
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            load_lock = self._loading.setdefault(model_id, threading.Lock())
        with load_lock:
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            loaded = self._load(directory)
            with self._lock:
                self._models[model_id] = loaded
                self._loading.pop(model_id, None)
                evicted = []
                while self.nbytes > self.max_bytes and len(self._models) > 1:
                    evicted.append(self._models.popitem(last=False)[1])
            if evicted:
                for model in evicted:
                    model.batcher.close()
                del evicted
                release_memory()
            return loaded

    def evict(self, model_id: str) -> None:
        with self._lock:
            evicted = self._models.pop(model_id, None)
        if evicted is not None:
            evicted.batcher.close()
            del evicted
            release_memory()

    def _load(self, directory: Path) -> LoadedModel:
        # channels_last: about twice the CPU forward throughput of the default layout for the
        # convolutional backbones measured here (bench/serve_load.py prints both).
        model = load_artifact(directory).eval().to(memory_format=torch.channels_last)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        loaded = LoadedModel(
            model=model,
            transform=create_transform(**resolve_model_data_config(model), is_training=False),
            labels=list(model.pretrained_cfg["label_names"]),
            temperature=read_temperature(directory),
            nbytes=nbytes,
            batcher=None,  # set below: it needs the bound method
        )
        loaded.batcher = MicroBatcher(loaded.logits, self.max_batch_size, self.max_wait_ms)
        return loaded


def release_memory() -> None:
    """Hand an evicted model's memory back to the system: glibc keeps freed blocks in its arenas,
    so without a trim the process would stay at its high-water mark instead of the cache budget."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def decode_image(filename: str, data: bytes, max_pixels: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise Invalid(
                    f"'{filename}' is {image.width}x{image.height} pixels; the limit is {max_pixels}.",
                    code="image_too_large",
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnsupportedMedia(f"'{filename}' is not a readable image: {exc}", code="invalid_image") from exc


def preprocess(loaded: LoadedModel, files: list[tuple[str, bytes]], max_pixels: int) -> torch.Tensor:
    return torch.stack([loaded.transform(decode_image(name, data, max_pixels)) for name, data in files])


async def predict(
    loaded: LoadedModel, batch: torch.Tensor, top_k: int, threshold: float | None
) -> tuple[list[list[tuple[str, float]] | None], int]:
    """Top-k (label, calibrated probability) per image, None where the best is below threshold;
    and the size of the forward pass that served them."""
    logits, batch_size = await loaded.batcher.submit(batch)
    probabilities = (logits / loaded.temperature).softmax(dim=1)
    scores, indices = probabilities.topk(top_k, dim=1)
    results: list[list[tuple[str, float]] | None] = []
    for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True):
        if threshold is not None and row_scores[0] < threshold:
            results.append(None)  # abstain: not confident enough
        else:
            results.append([(loaded.labels[i], s) for s, i in zip(row_scores, row_indices, strict=True)])
    return results, batch_size


async def embed(loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    return await asyncio.to_thread(loaded.embeddings, batch)
