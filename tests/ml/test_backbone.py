"""Folding batch norms into convolutions for inference, and serving's pixels (app/ml/backbone.py),
on the real pretrained backbones and real validation photos."""

import timm
import torch
from timm.data import create_transform, resolve_model_data_config
from timm.layers import BatchNormAct2d
from torchvision import transforms

from app.ml.backbone import build_model, fold_batch_norms, pixel_transform, unit_pixels
from app.ml.data import load_rgb
from tests.conftest import EFFICIENTNET_WEIGHTS, MOBILENET_WEIGHTS
from tests.ml.test_train import VAL


def real_batch(model: torch.nn.Module, count: int = 8) -> torch.Tensor:
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return torch.stack([transform(load_rgb(path)) for path, _ in VAL[:count]])


def test_uint8_pixels_scaled_are_the_values_of_timms_own_transform():
    every_value = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_pixels(every_value), transforms.ToTensor()(every_value.numpy().reshape(1, 256, 1)).flatten())
    model = build_model("mobilenetv2_100", 2, weights_file=MOBILENET_WEIGHTS)
    as_bytes, as_floats = pixel_transform(model, uint8=True), pixel_transform(model)
    timms = create_transform(**resolve_model_data_config(model), is_training=False)
    timms.transforms = [step for step in timms.transforms if not isinstance(step, transforms.Normalize)]
    for path, _ in VAL[:4]:
        image = load_rgb(path)
        sent = as_bytes(image)
        assert sent.dtype == torch.uint8 and torch.equal(unit_pixels(sent), as_floats(image))
        assert torch.equal(unit_pixels(sent), timms(image))


def test_folding_keeps_the_outputs_and_leaves_the_model_alone():
    for name, weights in (("mobilenetv2_100", MOBILENET_WEIGHTS), ("tf_efficientnet_lite0", EFFICIENTNET_WEIGHTS)):
        model = build_model(name, 2, weights_file=weights).eval()
        batch = real_batch(model)
        with torch.no_grad():
            before = model.forward_features(batch)
        folded = fold_batch_norms(model, batch[:2])
        assert folded is not model
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())  # every one folded
        # Their activations stay (ReLU6 in both backbones), one for each batch norm that had one.
        acts = [type(m.act) for m in norms if isinstance(m, BatchNormAct2d) and not isinstance(m.act, torch.nn.Identity)]
        kept = [type(m) for m in folded.modules() if type(m) in set(acts)]
        assert len(kept) == len(acts)
        with torch.no_grad():
            assert torch.allclose(folded.forward_features(batch), before, atol=1e-4, rtol=1e-4), name
            assert torch.equal(model.forward_features(batch), before)  # the original is untouched
            assert (folded(batch).argmax(1) == model(batch).argmax(1)).all()


def test_a_convolution_whose_output_is_also_used_elsewhere_is_not_folded():
    """A made-up block (no timm model is built this way): the convolution's output feeds the batch
    norm and is also added back. Folding would change the second use, so the check refuses it."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    block = Block().eval()
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    assert fold_batch_norms(block, torch.randn(2, 3, 16, 16)) is block


def test_a_model_without_batch_norms_is_returned_as_it_is():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=2).eval()  # random weights: only the layout matters
    assert fold_batch_norms(model, torch.randn(1, 3, 224, 224)) is model
