"""Building timm models and their preprocessing. Pure ML: no HTTP, no database."""

from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config


def build_model(
    architecture: str,
    num_classes: int,
    *,
    weights_file: Path | None,
    drop_path_rate: float | None = None,
    img_size: int | None = None,
) -> torch.nn.Module:
    """timm.create_model with pretrained weights read from `weights_file` (never downloaded here).

    `weights_file=None` means a randomly initialised model (the job asked for `pretrained: false`).
    timm replaces the ImageNet classifier with a fresh one of `num_classes` outputs.
    """
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size and timm.get_pretrained_cfg(architecture).fixed_input_size:
        kwargs["img_size"] = img_size  # e.g. ViTs: position embeddings are resampled by timm
    if weights_file is None:
        return timm.create_model(architecture, pretrained=False, **kwargs)
    model = timm.create_model(
        architecture, pretrained=True, pretrained_cfg_overlay={"file": str(weights_file)}, **kwargs
    )
    # Zero-start the new classifier: its default init (for some timm families uniform in
    # +-1/sqrt(num_classes)) gives large random logits on pretrained features, which training
    # then spends its first epochs unlearning.
    for parameter in model.get_classifier().parameters():
        torch.nn.init.zeros_(parameter)
    return model


def load_artifact(directory: Path) -> torch.nn.Module:
    """Load a trained model exactly as any timm user would: `local-dir:` plus its own config."""
    return timm.create_model(f"local-dir:{directory}", pretrained=True)


def preprocessing_of(model: torch.nn.Module) -> dict[str, Any]:
    """The eval preprocessing timm resolves for this model, as JSON-able values."""
    config = resolve_model_data_config(model)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
