"""Decoding a large JPEG at a reduced scale (libjpeg DCT scaling), in training and serving alike,
on real hymenoptera photos."""

import io

import pytest
import torch
from PIL import Image
from timm.data import create_transform

from app.ml.backbone import build_model, pixel_transform
from app.ml.data import DecodedImages, EvalResize, eval_resize
from app.serving.predictor import decode_image
from tests.conftest import HYMENOPTERA, MOBILENET_WEIGHTS

# The one 5-megapixel photo of the set (2592x1944), and an ordinary 500x375 one.
LARGE = (
    HYMENOPTERA
    / "val"
    / "ants"
    / ("ants-devouring-remains-of-large-dead-insect-on-red-tile-in-Stellenbosch-South-Africa-closeup-1-DHD.jpg")
)
SMALL = HYMENOPTERA / "val" / "ants" / "10308379_1b6c72e180.jpg"


def _transform_and_resize():
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    transform = pixel_transform(model)  # as serving builds it
    return transform, eval_resize(transform)


def test_a_large_jpeg_is_decoded_at_no_less_than_twice_its_resize_size():
    transform, resize = _transform_and_resize()
    short_side = resize.size
    data = LARGE.read_bytes()
    full = decode_image(LARGE.name, data, 10**8)
    reduced = decode_image(LARGE.name, data, 10**8, short_side)
    assert full.size == (2592, 1944) and resize == EvalResize(256, short_side_only=True)
    assert reduced.size == (1296, 972)  # half scale: a quarter would fall under 2 x 256
    difference = (transform(full) - transform(reduced)).abs()
    assert difference.mean() < 0.005 and difference.max() < 0.1  # [0, 1] pixels after resize and crop


def test_an_ordinary_photo_decodes_exactly_as_before():
    transform, resize = _transform_and_resize()
    short_side = resize.size
    data = SMALL.read_bytes()
    assert Image.open(io.BytesIO(data)).size == (500, 375)
    assert torch.equal(
        transform(decode_image(SMALL.name, data, 10**8)), transform(decode_image(SMALL.name, data, 10**8, short_side))
    )


def test_training_and_serving_see_the_same_pixels_of_a_large_photo():
    transform, resize = _transform_and_resize()
    cached = DecodedImages([LARGE], resize, "bicubic", max_bytes=10**9, threads=1)
    served = decode_image(LARGE.name, LARGE.read_bytes(), 10**8, resize.size)
    assert torch.equal(transform(cached[0]), transform(served))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"crop_pct": 0.95, "crop_mode": "squash"}, EvalResize(235, short_side_only=False)),
        ({"crop_pct": 1.0, "crop_mode": "border"}, EvalResize(224, short_side_only=False)),
        ({"crop_pct": 0.9, "input_size": (3, 224, 320)}, EvalResize(355, short_side_only=False)),
        ({"crop_pct": 0.875}, EvalResize(256, short_side_only=True)),
    ],
)
def test_every_crop_mode_gets_the_resize_of_its_own_eval_transform_and_the_same_pixels_in_training(config, expected):
    """timm's squash, border and non-square center crops are not a shorter-side resize: the training
    cache then keeps the decoded image as it is, so validation pixels still equal served pixels."""
    config = {"input_size": (3, 224, 224), "interpolation": "bilinear", **config}
    transform = create_transform(**config, is_training=False)
    resize = eval_resize(transform)
    assert resize == expected
    cached = DecodedImages([LARGE], resize, config["interpolation"], max_bytes=10**9, threads=1)
    served = decode_image(LARGE.name, LARGE.read_bytes(), 10**8, resize.size)
    assert torch.equal(transform(cached[0]), transform(served))
