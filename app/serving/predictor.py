"""Loading trained models for prediction and running them.

Models are loaded from their artifact exactly as a timm user would (`local-dir:`), with the
eval preprocessing resolved from that artifact's own config.
"""

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

DECODABLE_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    transform: Callable
    labels: list[str]
    temperature: float  # fitted on validation: softmax(logits / temperature) is calibrated


class ModelCache:
    """Least-recently-used cache of loaded models; concurrent first requests load a model once."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

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
            loaded = _load(directory)
            with self._lock:
                self._models[model_id] = loaded
                self._loading.pop(model_id, None)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return loaded

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)


def _load(directory: Path) -> LoadedModel:
    model = load_artifact(directory).eval()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return LoadedModel(
        model=model,
        transform=transform,
        labels=list(model.pretrained_cfg["label_names"]),
        temperature=read_temperature(directory),
    )


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


@torch.inference_mode()
def predict(loaded: LoadedModel, images: list[Image.Image], top_k: int) -> list[list[tuple[str, float]]]:
    batch = torch.stack([loaded.transform(image) for image in images])
    probabilities = (loaded.model(batch) / loaded.temperature).softmax(dim=1)
    scores, indices = probabilities.topk(top_k, dim=1)
    return [
        [(loaded.labels[i], float(s)) for s, i in zip(row_scores, row_indices, strict=True)]
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
    ]
