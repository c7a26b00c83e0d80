"""Samples from an ImageFolder-style directory, splits, class balance, and the decoded-image cache."""

import random
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.transforms import ResizeKeepRatio, str_to_pil_interp
from torchvision import transforms

from app.ml.image_formats import IMAGE_FORMATS

Sample = tuple[Path, int]


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


DRAFT_GAP = 2  # a JPEG is decoded at no less than this many times the size it is resized to


@dataclass(frozen=True)
class EvalResize:
    """The resize at the head of timm's eval transform, read from the transform itself.

    `size`: the longest side length it resizes to (any crop mode: center, squash, border;
    square or not). `short_side_only`: it is a plain shorter-side `Resize(size)` (timm's default
    center crop of a square input), which a pre-resize to the same short side leaves unchanged.
    """

    size: int
    short_side_only: bool


def eval_resize(eval_transform: transforms.Compose) -> EvalResize:
    for step in eval_transform.transforms:
        if isinstance(step, (transforms.Resize, ResizeKeepRatio)):
            size = step.size
            if isinstance(size, int) or len(size) == 1:
                return EvalResize(size if isinstance(size, int) else size[0], isinstance(step, transforms.Resize))
            return EvalResize(max(size), False)
    raise ValueError(f"no resize step in the eval transform: {eval_transform}")


def upright_rgb(image: Image.Image, resize: int | None = None) -> Image.Image:
    """RGB pixels the right way up: a camera's EXIF orientation applied, as a photo viewer shows it.
    Training, serving and the ONNX parity check all decode through here, so they agree.

    `resize`: the longest side length the eval transform resizes to (`EvalResize.size`). A JPEG
    more than twice that size in both dimensions is then decoded by libjpeg at a reduced scale (DCT
    scaling), never below twice that size, as Pillow's own `thumbnail()` does: a 12-megapixel
    photo costs a fraction of a full decode, and the resize that follows still shrinks it at least
    twofold.
    """
    if resize is not None:
        image.draft(None, (DRAFT_GAP * resize, DRAFT_GAP * resize))  # a no-op for other formats
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an already upright photo
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: Path, resize: int | None = None) -> Image.Image:
    with Image.open(path, formats=IMAGE_FORMATS) as image:
        return upright_rgb(image, resize)


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
    are decoded on use, identically. Images are shrunk ahead only where the eval transform starts
    with a plain shorter-side resize, which then leaves them as they are, so validation pixels
    equal served ones in every crop mode.
    """

    def __init__(self, paths: list[Path], resize: EvalResize, interpolation: str, max_bytes: int, threads: int,
                 check: Callable[[], None] = lambda: None):  # fmt: skip
        """`check` is called as images are decoded (a worker's heartbeat: decoding a large dataset
        takes a while, and may be stopped)."""
        self.paths = paths
        self.resize = resize
        self.resample = str_to_pil_interp(interpolation)
        self.pixels: list[np.ndarray | None] = [None] * len(paths)
        self.nbytes = 0
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for index, image in enumerate(pool.map(self._decode, paths)):
                check()
                array = np.array(image)  # writable: training views it as a tensor, uncopied (app/ml/tensor_augment.py)
                if self.nbytes + array.nbytes > max_bytes:
                    continue
                self.pixels[index] = array
                self.nbytes += array.nbytes

    @property
    def complete(self) -> bool:
        """Every image is kept: none is decoded on use."""
        return all(pixels is not None for pixels in self.pixels)

    def _decode(self, path: Path) -> Image.Image:
        image = load_rgb(path, self.resize.size)
        if self.resize.short_side_only:
            image = _resize_short_side(image, self.resize.size, self.resample)
        return image

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
