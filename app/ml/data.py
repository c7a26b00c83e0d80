"""Samples from an ImageFolder-style dataset directory, splits, and a torch Dataset over them."""

import random
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

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


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label
