"""timm's train transform as tensor operations (app/ml/tensor_augment.py), on real hymenoptera photos."""

import numpy as np
import pytest
import torch
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from timm.utils import random_seed
from torchvision.transforms import InterpolationMode, v2

from app.ml.data import list_samples, load_rgb
from app.ml.tensor_augment import DeviceImages, TensorAugmentation
from tests.conftest import HYMENOPTERA

PHOTOS = [path for path, _ in list_samples(HYMENOPTERA / "train", ["ants", "bees"])[::12]]  # 21 photos
CPU = torch.device("cpu")
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def chw(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image)).permute(2, 0, 1)


def test_each_step_of_timms_train_transform_keeps_its_parameters():
    timm_transform = create_transform(224, is_training=True, interpolation="bicubic", re_prob=0.25)
    augmentation = TensorAugmentation.of(timm_transform, CPU)
    crop, flip, jitter = augmentation.per_image.transforms
    assert isinstance(crop, v2.RandomResizedCrop) and tuple(crop.size) == (224, 224)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == InterpolationMode.BICUBIC and crop.antialias
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, v2.ColorJitter)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4),) * 3 + (None,)
    to_float, normalize, erasing = augmentation.batched
    assert isinstance(to_float, v2.ToDtype) and to_float.scale
    assert normalize.mean == pytest.approx([0.485, 0.456, 0.406]) and normalize.std == pytest.approx([0.229, 0.224, 0.225])
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.25 and erasing.device == CPU


def test_steps_without_a_tensor_form_are_left_to_loader_processes():
    assert TensorAugmentation.of(create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5"), CPU) is None
    # timm's default interpolation for training: a random choice per image, which v2 does not draw
    assert TensorAugmentation.of(create_transform(224, is_training=True, interpolation="random"), CPU) is None


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_the_tensor_pixels_equal_pillows_where_nothing_is_random(device):
    """With the crop fixed to the whole photo (scale 1, the photo's own aspect ratio), the flip
    always on and no colour jitter, both forms must give the same training input. torchvision's
    antialiased bicubic resize follows Pillow's (same kernel, a = -0.5)."""
    for path in PHOTOS:
        image = load_rgb(path)
        ratio = image.width / image.height
        transform = create_transform(224, is_training=True, interpolation="bicubic", scale=(1.0, 1.0), ratio=(ratio, ratio),
                                     hflip=1.0, color_jitter=0)  # fmt: skip
        expected = transform(image)
        got = TensorAugmentation.of(transform, torch.device(device))([chw(image).to(device)])[0].cpu()
        difference = ((got - expected) * STD).abs()  # in pixel units of [0, 1]
        assert difference.mean() < 1 / 255 and difference.max() <= 8 / 255, path


def test_a_batch_is_augmented_image_by_image():
    images = DeviceImages([np.array(load_rgb(path, 256)) for path in PHOTOS[:8]], [0] * 4 + [1] * 4,
                          TensorAugmentation.of(create_transform(224, is_training=True, interpolation="bicubic",
                                                                 re_prob=1.0), CPU), CPU)  # fmt: skip
    random_seed(0)
    (batch, labels), (rest, rest_labels) = images.batches([[0, 1, 2, 3, 4, 5], [7, 6]])
    assert batch.shape == (6, 3, 224, 224) and batch.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 0, 1, 1] and rest_labels.tolist() == [1, 1] and rest.shape[0] == 2
    # Each image has its own crop, flip and jitter: no two are alike.
    assert all(not torch.equal(batch[i], batch[j]) for i in range(6) for j in range(i))
    # Random erasing (probability 1) blanked a patch of each image with zeros, the normalised mean.
    assert all((image == 0).all(dim=0).sum() > 100 for image in batch)
    # Drawn from torch's generator and Python's (random erasing): an epoch reseeded as the engine
    # reseeds each epoch repeats itself, so a resumed run goes on as the uninterrupted one.
    random_seed(0)
    again, _ = next(images.batches([[0, 1, 2, 3, 4, 5]]))
    torch.testing.assert_close(again, batch)


@needs_cuda
def test_on_a_gpu_the_pixels_and_the_augmentation_stay_there():
    cuda = torch.device("cuda")
    transform = create_transform(224, is_training=True, interpolation="bicubic", re_prob=0.5)
    images = DeviceImages([np.array(load_rgb(path, 256)) for path in PHOTOS], [0] * len(PHOTOS),
                          TensorAugmentation.of(transform, cuda), cuda)  # fmt: skip
    assert all(pixels.device.type == "cuda" for pixels in images.pixels)
    batch, labels = next(images.batches([list(range(len(PHOTOS)))]))
    assert batch.device.type == "cuda" and labels.device.type == "cuda" and batch.shape == (len(PHOTOS), 3, 224, 224)
