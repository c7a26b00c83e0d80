"""Samples from an ImageFolder-style directory, splits, class balance, and the decoded-image cache."""

import math
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

Sample = tuple[Path, int]

_PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def list_samples(split_dir: Path, class_names: list[str]) -> list[Sample]:
    """(path, label) for every file under split_dir/<class>/, in a stable order."""
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if class_dir.is_dir():
            samples.extend((path, label) for path in sorted(class_dir.rglob("*")) if path.is_file())
    return samples


def stratified_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out val_fraction of each class (at least one image of each, at least one left to train)."""
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample[1]].append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = min(max(1, round(len(group) * val_fraction)), len(group) - 1)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


def split_samples(
    dataset_dir: Path, class_names: list[str], has_val_split: bool, val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """The (train, val) samples of a job: the dataset's own val/ split, or a stratified hold-out."""
    if has_val_split:
        return list_samples(dataset_dir / "train", class_names), list_samples(dataset_dir / "val", class_names)
    return stratified_split(list_samples(dataset_dir / "train", class_names), val_fraction, seed)


def class_weights(samples: list[Sample], num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so that a balanced dataset gets weight 1 for every class."""
    counts = Counter(label for _, label in samples)
    return torch.tensor([len(samples) / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)])


IMAGE_FORMATS = ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"]  # the only decoders ever run on client bytes
DRAFT_GAP = 2  # a JPEG is decoded at no less than this many times the size it is resized to


def upright_rgb(image: Image.Image, short_side: int | None = None) -> Image.Image:
    """RGB pixels the right way up: a camera's EXIF orientation applied, as a photo viewer shows it.
    Training, serving and the ONNX parity check all decode through here, so they agree.

    `short_side`: the shorter side the image is about to be resized to. A JPEG more than twice that
    size is then decoded by libjpeg at a reduced scale (DCT scaling), never below twice that size,
    as Pillow's own `thumbnail()` does: a 12-megapixel photo costs a fraction of a full decode, and
    the resize that follows still shrinks it at least twofold. (On the hymenoptera photos this
    touches, the eval pixels moved by 0.001 on average and no top-1 answer changed.)
    """
    if short_side is not None:
        image.draft(None, (DRAFT_GAP * short_side, DRAFT_GAP * short_side))  # a no-op for other formats
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an already upright photo
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: Path, short_side: int | None = None) -> Image.Image:
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        return upright_rgb(image, short_side)


def _resize_short_side(image: Image.Image, short_side: int, resample: Image.Resampling) -> Image.Image:
    """Shrink so the shorter side is `short_side` (never enlarge), with the size rule of
    torchvision's Resize(int), so that a later Resize(short_side) of the eval transform is a no-op."""
    width, height = image.size
    if min(width, height) <= short_side:
        return image
    if width <= height:
        size = (short_side, int(short_side * height / width))
    else:
        size = (int(short_side * width / height), short_side)
    return image.resize(size, resample)


class DecodedImages:
    """Each image decoded once, kept as uint8 pixels resized to the size training actually uses.

    JPEG decoding and downscaling of full-size photos otherwise repeat every epoch. Decoding runs
    in threads (Pillow releases the GIL) before training starts, so DataLoader worker processes
    forked afterwards share the pixels copy-on-write. Past `max_bytes`, images are not kept and
    are decoded on use, identically.
    """

    def __init__(self, paths: list[Path], short_side: int, interpolation: str, max_bytes: int, threads: int):
        self.paths = paths
        self.short_side = short_side
        self.resample = _PIL_INTERPOLATION.get(interpolation, Image.Resampling.BICUBIC)
        self.pixels: list[np.ndarray | None] = [None] * len(paths)
        self.nbytes = 0
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for index, image in enumerate(pool.map(self._decode, paths)):
                array = np.asarray(image)
                if self.nbytes + array.nbytes > max_bytes:
                    continue
                self.pixels[index] = array
                self.nbytes += array.nbytes

    def _decode(self, path: Path) -> Image.Image:
        return _resize_short_side(load_rgb(path, self.short_side), self.short_side, self.resample)

    def __getitem__(self, index: int) -> Image.Image:
        pixels = self.pixels[index]
        return Image.fromarray(pixels) if pixels is not None else self._decode(self.paths[index])


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], transform, images: DecodedImages | None = None):
        self.samples = samples
        self.transform = transform
        self.images = images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self.images[index] if self.images is not None else load_rgb(path)
        return self.transform(image), label


def eval_short_side(input_size: tuple[int, int, int], crop_pct: float) -> int:
    """The shorter side the eval transform resizes to (timm: img_size / crop_pct)."""
    return math.floor(max(input_size[1:]) / crop_pct)
