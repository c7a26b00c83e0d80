"""Decoding a large JPEG at a reduced scale (libjpeg DCT scaling), in training and serving alike,
on real hymenoptera photos."""

import io

import torch
from PIL import Image
from timm.data import resolve_model_data_config

from app.ml.backbone import build_model, pixel_transform
from app.ml.data import DecodedImages, eval_short_side
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


def _transform_and_short_side():
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    config = resolve_model_data_config(model)  # as serving resolves it
    return pixel_transform(model), eval_short_side(config["input_size"], config["crop_pct"])


def test_a_large_jpeg_is_decoded_at_no_less_than_twice_its_resize_size():
    transform, short_side = _transform_and_short_side()
    data = LARGE.read_bytes()
    full = decode_image(LARGE.name, data, 10**8)
    reduced = decode_image(LARGE.name, data, 10**8, short_side)
    assert full.size == (2592, 1944) and short_side == 256
    assert reduced.size == (1296, 972)  # half scale: a quarter would fall under 2 x 256
    difference = (transform(full) - transform(reduced)).abs()
    assert difference.mean() < 0.005 and difference.max() < 0.1  # [0, 1] pixels after resize and crop


def test_an_ordinary_photo_decodes_exactly_as_before():
    transform, short_side = _transform_and_short_side()
    data = SMALL.read_bytes()
    assert Image.open(io.BytesIO(data)).size == (500, 375)
    assert torch.equal(
        transform(decode_image(SMALL.name, data, 10**8)), transform(decode_image(SMALL.name, data, 10**8, short_side))
    )


def test_training_and_serving_see_the_same_pixels_of_a_large_photo():
    transform, short_side = _transform_and_short_side()
    cached = DecodedImages([LARGE], short_side, "bicubic", max_bytes=10**9, threads=1)
    served = decode_image(LARGE.name, LARGE.read_bytes(), 10**8, short_side)
    assert torch.equal(transform(cached[0]), transform(served))
