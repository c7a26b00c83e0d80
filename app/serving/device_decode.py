"""JPEG decoding where the forward pass runs (`VISIONTUNE_SERVING_DECODE=device`).

By default each API process decodes its requests' images with Pillow, one at a time, on its own
cores (`predictor.preprocess`). With `device`, a prediction whose images are all plain JPEGs sends
their bytes instead, and the model's micro-batcher decodes every JPEG of a batch in one call to
`torchvision.io.decode_jpeg` where the model runs: on a GPU that is nvjpeg, in one batch (on the
H100 of bench/SPEED.md, 4.5x the images/s of 16 CPU threads running Pillow), and the eval
transform's resize and crop run there too, on the decoded tensors. On a CPU it is libjpeg-turbo.

The pixels differ from Pillow's by less than one level in 255 on average: the decoders' IDCT and
chroma upsampling differ, and Pillow may decode a large JPEG at a reduced scale first
(`app.ml.data.upright_rgb`). The default, `auto`, decodes this way only where it pays: where an
inference process runs the forward passes on a GPU (`Serving.decodes_on_device`). What it cannot take exactly as
the API process would, the API process keeps decoding with Pillow: other formats, a photo with an
EXIF orientation to apply, CMYK, an eval transform other than timm's resize-and-centre-crop, and any
JPEG that the device's decoder refuses (`DeviceUndecodable`: the request is decoded again with
Pillow, which gives its usual answer, including the 415 for a corrupt file).
"""

import io
from dataclasses import dataclass

import torch
from PIL import ExifTags, Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from app.ml.image_formats import IMAGE_FORMATS

# torchvision's decoder, though torchvision 0.29 deprecates its image decoding for TorchCodec's: it
# comes with the torchvision that timm already needs, built for the same PyTorch, so its nvjpeg
# works on whatever CUDA build of PyTorch a GPU machine has, where TorchCodec's wheels each need
# the PyTorch release they were built for. (TorchCodec 0.17's `decode_jpeg` takes the same lists.)


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG's bytes, queued in a micro-batcher in place of its pixels."""

    data: bytes | memoryview


class DeviceUndecodable(RuntimeError):
    """The device's decoder refused the JPEG; the API process decodes the request with Pillow instead."""

    code = "device_undecodable"


def tensor_steps(transform: transforms.Compose) -> list[torch.nn.Module] | None:
    """The eval transform's steps before its pixel conversion, when they all run on uint8 tensors
    just as on PIL images (torchvision's Resize and CenterCrop: timm's 'center' and 'squash' crop
    modes); None otherwise (timm's 'border' mode, which pads PIL images: Pillow keeps decoding)."""
    steps = transform.transforms[:-1]
    return steps if all(type(step) in (transforms.Resize, transforms.CenterCrop) for step in steps) else None


def plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """Whether the device may decode these bytes as the API process would: a JPEG within the pixel
    limit, in RGB or greyscale, with no EXIF rotation to apply. Reads the header only; anything
    else, unreadable bytes included, is for Pillow (and its error answers)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            return (
                image.format == "JPEG"
                and image.mode in ("RGB", "L")
                and image.width * image.height <= max_pixels
                and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
            )
    except Exception:  # noqa: BLE001 - Pillow's many ways of refusing bytes; it answers them itself later
        return False


def decode(
    jpegs: list[EncodedJpeg], steps: list[torch.nn.Module], device: torch.device
) -> list[torch.Tensor | DeviceUndecodable]:
    """uint8 CHW pixels on `device` per JPEG, through the eval transform's `steps`; or the error of
    one that would not decode (the others still do)."""
    encoded = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]  # (a writable copy)
    try:
        decoded: list = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad JPEG fails the whole batched call: find which, one by one
        decoded = [_decode_one(data, device) for data in encoded]
    for i, image in enumerate(decoded):
        if isinstance(image, torch.Tensor):
            for step in steps:
                image = step(image)
            decoded[i] = image
    return decoded


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | DeviceUndecodable:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        return DeviceUndecodable(str(exc))
