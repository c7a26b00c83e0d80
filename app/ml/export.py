"""The one artifact format: timm's Hugging Face layout plus the validation metrics."""

import json
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf


def save_artifact(
    model: torch.nn.Module, directory: Path, label_names: list[str], metrics: dict[str, Any], temperature: float
) -> None:
    """config.json (with label_names, and the calibration temperature that serving divides the
    logits by) + model.safetensors, loadable by `timm.create_model("local-dir:<directory>")`;
    metrics.json beside them."""
    save_for_hf(
        model,
        str(directory),
        model_config={"label_names": list(label_names), "temperature": temperature},
        safe_serialization=True,
    )
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2))


def read_temperature(directory: Path) -> float:
    return float(json.loads((directory / "config.json").read_text()).get("temperature", 1.0))
