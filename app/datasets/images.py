"""A ready dataset's images as they are kept (train/<class>/... and val/<class>/..., see ingest.py):
listed by path for a client to browse, and each shown as a small JPEG thumbnail.

A path is the file's place below the dataset's root, "/"-separated ("train/bees/1.jpg"), the same
form a model's validation predictions name its images in. Only a path the listing holds is ever
opened: a client's path is looked up in it before it comes near the file system.
"""

import io
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.core.config import Settings
from app.core.errors import Conflict, Invalid, NotFound
from app.datasets.service import local_dataset
from app.db.tables import Dataset
from app.ml.data import list_samples, load_rgb

SPLITS = ("train", "val")  # all that ingest keeps: valid/ and validation/ become val/, a flat layout train/
THUMBNAIL_QUALITY = 85


@dataclass(frozen=True)
class ImageFile:
    path: str
    label: str
    split: str


def list_images(
    settings: Settings, dataset: Dataset, label: str | None, limit: int, after: str | None
) -> list[ImageFile]:
    """Up to `limit` of the dataset's images in path order, of class `label` if given, after the
    path `after` (any string: the page starts at the first path greater than it)."""
    images = _images(settings, dataset)
    if label is not None and label not in _class_names(dataset):
        raise Invalid(f"Dataset '{dataset.id}' has no class {label!r}; GET /v1/datasets/{dataset.id} lists its "
                      "classes.", code="unknown_label", details=[{"label": label}])  # fmt: skip
    start = 0 if after is None else bisect_right(images, after, key=lambda image: image.path)
    found = []
    for image in images[start:]:
        if label is None or image.label == label:
            found.append(image)
            if len(found) == limit:
                break
    return found


def thumbnail(settings: Settings, dataset: Dataset, path: str, size: int) -> bytes:
    """The image at `path` as a JPEG whose longest side is at most `size`, the right way up (EXIF
    orientation applied), decoded at a reduced scale where the JPEG allows it."""
    images = _images(settings, dataset)
    index = bisect_left(images, path, key=lambda image: image.path)
    if index == len(images) or images[index].path != path:
        raise _no_image(dataset, path)
    root = local_dataset(settings, dataset)
    file = root / path
    if not file.resolve().is_relative_to(root.resolve()):  # belt and braces: ingest keeps no links
        raise _no_image(dataset, path)
    image = load_rgb(file, resize=size)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def _no_image(dataset: Dataset, path: str) -> NotFound:
    return NotFound(f"Dataset '{dataset.id}' has no image {path!r}.", code="image_not_found")


def _class_names(dataset: Dataset) -> list[str]:
    return [c["name"] for c in dataset.classes]


def _images(settings: Settings, dataset: Dataset) -> tuple[ImageFile, ...]:
    if dataset.status != "ready":
        raise Conflict(f"Dataset '{dataset.id}' is {dataset.status}: its images can be read once it is ready.",
                       code="dataset_not_ready")  # fmt: skip
    return _listing(local_dataset(settings, dataset), tuple(_class_names(dataset)))


@lru_cache(maxsize=16)
def _listing(root: Path, class_names: tuple[str, ...]) -> tuple[ImageFile, ...]:
    """Every image below `root`, sorted by path. Walked once per directory: a dataset's directory
    is named after its content (datasets/<sha256>) and never changes, and pages and thumbnails
    would otherwise each walk the whole dataset."""
    images = [
        ImageFile(file.relative_to(root).as_posix(), class_names[label], split)
        for split in SPLITS
        for file, label in list_samples(root / split, list(class_names))  # the files a job reads
    ]
    return tuple(sorted(images, key=lambda image: image.path))
