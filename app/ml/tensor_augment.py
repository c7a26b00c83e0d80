"""timm's training augmentation as tensor operations on the device that trains.

On a GPU, `full` training was capped by the CPU: 8 loader processes cropping, flipping and
colour-jittering each photo with Pillow held an H100 to ~550 images/s (bench/SPEED.md). Where
every training image is kept decoded (app/ml/data.py's DecodedImages), its pixels go to the device
once, and each batch is augmented there by torchvision's tensor transforms (transforms.v2), which
take the same parameters as the timm steps they stand for and draw them the same way.

Only steps with a tensor counterpart are translated. A transform with any other step (an
AutoAugment or RandAugment policy, a random choice of interpolation) is left to loader processes.
"""

import copy
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2


class TensorAugmentation:
    """Per-image steps (crop, flips, colour) on uint8 CHW tensors, then batched ones (to float,
    normalise, random erasing) on the stacked batch."""

    def __init__(self, per_image: list, batched: list):
        self.per_image = v2.Compose(per_image)
        self.batched = batched

    @classmethod
    def of(cls, transform: transforms.Compose, device: torch.device) -> "TensorAugmentation | None":
        """The tensor form of timm's train transform, or None where a step has none."""
        per_image: list = []
        batched: list = []
        for step in transform.transforms:
            image_step = _per_image_step(step)
            if image_step is not None and not batched:
                per_image.append(image_step)
            elif isinstance(step, MaybeToTensor):
                batched.append(v2.ToDtype(torch.float32, scale=True))
            elif isinstance(step, transforms.Normalize):
                batched.append(v2.Normalize(torch.as_tensor(step.mean).tolist(), torch.as_tensor(step.std).tolist()))
            elif isinstance(step, RandomErasing):
                erasing = copy.copy(step)  # timm's own, which erases a batch in place on its device
                erasing.device = device
                batched.append(erasing)
            else:
                return None
        return cls(per_image, batched)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack([self.per_image(image) for image in images])
        for step in self.batched:
            batch = step(batch)
        return batch


def _per_image_step(step):
    if isinstance(step, RandomResizedCropAndInterpolation) and isinstance(step.interpolation, InterpolationMode):
        return v2.RandomResizedCrop(step.size, step.scale, step.ratio, interpolation=step.interpolation, antialias=True)
    if isinstance(step, transforms.RandomHorizontalFlip):
        return v2.RandomHorizontalFlip(step.p)
    if isinstance(step, transforms.RandomVerticalFlip):
        return v2.RandomVerticalFlip(step.p)
    if isinstance(step, transforms.ColorJitter):
        return v2.ColorJitter(step.brightness, step.contrast, step.saturation, step.hue)
    return None


class DeviceImages:
    """Training images kept on the device as uint8 CHW tensors, augmented there batch by batch."""

    def __init__(self, pixels: list[np.ndarray], labels: list[int], augmentation: TensorAugmentation,
                 device: torch.device):  # fmt: skip
        # On a CPU, views of the kept arrays (nothing writes to them); on a GPU, one copy each.
        self.pixels = [torch.from_numpy(array).permute(2, 0, 1).to(device) for array in pixels]
        self.labels = torch.tensor(labels, device=device)
        self.augmentation = augmentation

    def batches(self, order: Iterable[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The augmented batches of `order`'s batches of indices (a BatchSampler's, as a DataLoader
        over the same sampler would load them)."""
        for indices in order:
            yield self.augmentation([self.pixels[i] for i in indices]), self.labels[indices]
