"""Building timm models and their preprocessing. Pure ML: no HTTP, no database."""

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import transforms


def build_model(
    name: str,
    num_classes: int,
    *,
    weights_file: Path | None,
    drop_path_rate: float | None = None,
    img_size: int | None = None,
) -> torch.nn.Module:
    """timm.create_model with pretrained weights read from `weights_file` (never downloaded here).

    `name` is "architecture.tag" (or the architecture alone for timm's default tag): the tag
    decides the pretrained config (interpolation, crop, mean/std, input size) that training,
    the artifact's config.json, serving and the ONNX export all resolve their preprocessing from,
    so it must be the tag whose weights `weights_file` holds.
    `weights_file=None` means a randomly initialised model (the job asked for `pretrained: false`).
    timm replaces the ImageNet classifier with a fresh one of `num_classes` outputs.
    `img_size` trains (and so serves) at that size instead of the tag's.
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size and timm.get_pretrained_cfg(name).fixed_input_size:
        kwargs["img_size"] = img_size  # e.g. ViTs: position embeddings are resampled by timm
    if weights_file is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)}, **kwargs)
        # Zero-start the new classifier: its default init (for some timm families uniform in
        # +-1/sqrt(num_classes)) gives large random logits on pretrained features, which training
        # then spends its first epochs unlearning.
        for parameter in model.get_classifier().parameters():
            torch.nn.init.zeros_(parameter)
    if img_size:
        # The size is part of the model's own config, which save_for_hf writes to config.json:
        # what resolves the preprocessing from the model (trainer, serving, export) then agrees.
        config = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}
        config.pop("test_input_size", None)
        model.pretrained_cfg = config
    return model


def load_artifact(directory: Path) -> torch.nn.Module:
    """Load a trained model exactly as any timm user would: `local-dir:` plus its own config."""
    return timm.create_model(f"local-dir:{directory}", pretrained=True)


def preprocessing_of(model: torch.nn.Module) -> dict[str, Any]:
    """The eval preprocessing timm resolves for this model, as JSON-able values."""
    config = resolve_model_data_config(model)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


class CalibratedClassifier(torch.nn.Module):
    """[0, 1] pixels in, calibrated probabilities out: the model plus the normalisation before it and
    the temperature-scaled softmax after it. What serving runs and what the ONNX export contains."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        config = resolve_model_data_config(model)
        self.model = model
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32).view(1, -1, 1, 1))
        self.temperature = float(temperature)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std  # the arithmetic of torchvision's Normalize

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self.model(self.normalize(pixels)) / self.temperature).softmax(dim=1)

    def embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled features the classifier takes."""
        return self.model.forward_head(self.model.forward_features(self.normalize(pixels)), pre_logits=True)


def pixel_transform(model: torch.nn.Module, uint8: bool = False) -> transforms.Compose:
    """timm's eval transform for this model up to ToTensor: the [0, 1] pixels CalibratedClassifier takes;
    or, with `uint8`, the same pixels as uint8 (a quarter of the bytes, for an API process to send to
    the inference process, where `unit_pixels` finishes the job).

    Dropping the Normalize step (rather than rebuilding with mean 0 / std 1) keeps every other
    step identical, including the mean-coloured padding of timm's 'border' crop mode. ToTensor
    itself is swapped for `ToPixels`, which gives the same values.
    """
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    steps = [step for step in transform.transforms if not isinstance(step, transforms.Normalize)]
    if len(steps) != len(transform.transforms) - 1 or not isinstance(steps[-1], transforms.ToTensor):
        raise ValueError(f"expected the eval transform to end in ToTensor, Normalize: {transform}")
    return transforms.Compose([*steps[:-1], pixel_bytes if uint8 else ToPixels()])


class ToPixels:
    """An RGB PIL image to float32 CHW pixels in [0, 1], equal to torchvision's ToTensor, in NumPy.

    ToTensor's conversion runs on PyTorch's intra-op thread pool, entered from every request thread
    at once in the API; NumPy stays on the calling thread.
    """

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1), dtype=np.float32)
        pixels /= np.float32(255)
        return torch.from_numpy(pixels)


def pixel_bytes(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 CHW pixels."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


def unit_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, on any device, in any memory format) as float32 in [0, 1], the
    values of torchvision's ToTensor: on a GPU, a quarter of the bytes cross to it and the GPU scales."""
    return pixels.to(torch.float32).div_(_two_five_five(pixels.device))


@functools.cache
def _two_five_five(device: torch.device) -> torch.Tensor:
    # A tensor on the device rather than a Python number: CUDA divides by a Python number as a
    # multiplication by its reciprocal, which can be a bit off ToTensor's true division. Made once,
    # so that a CUDA graph captured around unit_pixels (after a warm-up call) copies nothing in.
    return torch.tensor(255.0, device=device)


def fold_batch_norms(model: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """An inference copy of `model` (in eval mode) in which every batch norm that takes a
    convolution's output directly is folded into that convolution (torch's fuse_conv_bn_eval):
    one pass over the activations instead of two. On a CPU in fp32, channels-last, it made
    mobilenetv2_100's forward pass 1.6x faster, within 1e-5 of the original.

    Which batch norm follows which convolution is read from one forward pass of `example` (the
    convolution's output tensor is the batch norm's input), not from the module's layout; a timm
    BatchNormAct2d keeps its activation. The copy is checked against `model` on `example`: if it
    differs by more than float rounding (a convolution's output also used elsewhere, say), or if
    there is nothing to fold, `model` itself is returned."""
    model.eval()
    outputs: dict[int, str] = {}  # id of a convolution's output tensor -> the convolution's name
    pairs: list[tuple[str, str]] = []
    names = {module: name for name, module in model.named_modules()}

    def after_conv(module, _inputs, output):
        outputs[id(output)] = names[module]

    def before_norm(module, inputs):
        if id(inputs[0]) in outputs:
            pairs.append((outputs[id(inputs[0])], names[module]))

    hooks = [m.register_forward_hook(after_conv) for m in names if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_norm) for m in names if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            expected = model(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    for conv_name, norm_name in pairs:
        norm = folded.get_submodule(norm_name)
        _replace(folded, conv_name, fuse_conv_bn_eval(folded.get_submodule(conv_name), norm))
        # timm's BatchNormAct2d normalises, then applies its dropout and activation: those stay.
        rest = [getattr(norm, part) for part in ("drop", "act") if isinstance(getattr(norm, part, None), torch.nn.Module)]
        _replace(folded, norm_name, torch.nn.Sequential(*rest))
    with torch.no_grad():
        if not torch.allclose(folded(example), expected, rtol=1e-4, atol=1e-4):
            return model
    return folded


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
