"""The timm catalogue and pretrained-weight resolution.

Weights are looked for in the local weights directory first (files named
`<architecture>.<tag>.safetensors` or `<architecture>.safetensors`), then in the Hugging Face
Hub cache. Nothing is downloaded here: workers may have no network.
"""

import difflib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from timm.models import get_pretrained_cfg, split_model_name_tag

from app.core.config import Settings
from app.core.errors import Invalid


@dataclass
class WeightsLookup:
    file: Path | None
    source: str | None  # "local" | "hub-cache" | None
    searched: list[str] = field(default_factory=list)
    tag: str = ""  # the pretrained tag the file holds ("": timm's default, for `<architecture>.safetensors`)

    def model_name(self, architecture: str) -> str:
        """The timm name to build: with the tag of these weights, so that its pretrained config
        (preprocessing, input size) goes with them; a local file under a tag timm does not know
        (e.g. `mobilenetv2_100.tv_in1k`) gets the architecture's default config."""
        return f"{architecture}.{self.tag}" if self.tag in pretrained_tags(architecture) else architecture

    def explain(self) -> str:
        if self.file:
            return f"pretrained weights from {self.source}: {self.file}"
        return "no pretrained weights found; looked in: " + "; ".join(self.searched)


def split_backbone(name: str, settings: Settings) -> tuple[str, str]:
    """Validate a backbone name ("arch" or "arch.tag") against timm; 422 with the nearest names."""
    architecture, tag = split_model_name_tag(name.strip())
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Closest timm names: {', '.join(close)}." if close else " See GET /v1/backbones?search=..."
        raise Invalid(f"Unknown backbone '{name}'.{hint}", code="unknown_backbone", details=close)
    if tag and tag not in pretrained_tags(architecture) and not _local_file(settings, architecture, tag):
        raise Invalid(
            f"'{architecture}' has no pretrained tag '{tag}'. Known tags: {', '.join(pretrained_tags(architecture)) or 'none'}.",
            code="unknown_backbone",
            details=pretrained_tags(architecture),
        )
    return architecture, tag


@lru_cache(maxsize=4096)
def pretrained_tags(architecture: str) -> list[str]:
    """Tags in timm's order; the first is timm's default."""
    return [split_model_name_tag(n)[1] for n in timm.list_pretrained(f"{architecture}.*")]


def _local_file(settings: Settings, architecture: str, tag: str) -> Path | None:
    if not settings.weights_dir:
        return None
    path = settings.weights_dir / (f"{architecture}.{tag}.safetensors" if tag else f"{architecture}.safetensors")
    return path if path.is_file() else None


def find_weights(settings: Settings, architecture: str, tag: str = "") -> WeightsLookup:
    lookup = WeightsLookup(file=None, source=None)
    if settings.weights_dir:
        if tag:
            candidates = [settings.weights_dir / f"{architecture}.{tag}.safetensors"]
        else:
            defaults = [f"{architecture}.{t}.safetensors" for t in pretrained_tags(architecture)[:1]]
            candidates = [settings.weights_dir / f"{architecture}.safetensors"]
            candidates += [settings.weights_dir / name for name in defaults]
            candidates += sorted(settings.weights_dir.glob(f"{architecture}.*.safetensors"))
        for path in candidates:
            if path.is_file():
                lookup.file, lookup.source = path, "local"
                lookup.tag = path.name.removesuffix(".safetensors").removeprefix(architecture).removeprefix(".")
                return lookup
        lookup.searched.append(f"{settings.weights_dir}/{architecture}{'.' + tag if tag else '[.<tag>]'}.safetensors")
    else:
        lookup.searched.append("local weights directory (VISIONTUNE_WEIGHTS_DIR is not set)")
    for hub_tag in [tag] if tag else pretrained_tags(architecture):
        if hub_tag not in pretrained_tags(architecture):
            continue
        hub_id = get_pretrained_cfg(f"{architecture}.{hub_tag}").hf_hub_id
        if not hub_id:
            continue
        cached = try_to_load_from_cache(hub_id, "model.safetensors")
        if isinstance(cached, str):
            lookup.file, lookup.source, lookup.tag = Path(cached), "hub-cache", hub_tag
            return lookup
        lookup.searched.append(f"Hugging Face Hub cache: {hub_id}/model.safetensors")
    return lookup


@lru_cache(maxsize=4096)
def model_shape(architecture: str) -> tuple[int, list[int]]:
    """Parameter count (built on the meta device: no memory, no weights) and default input size."""
    with torch.device("meta"):
        model = timm.create_model(architecture)
    return sum(p.numel() for p in model.parameters()), list(model.pretrained_cfg.get("input_size", (3, 224, 224)))


def list_backbones(
    settings: Settings, search: str | None, limit: int, offset: int, pretrained_here: bool = False
) -> tuple[int, list[dict]]:
    names = timm.list_models(f"*{search}*" if search else "")
    if pretrained_here:  # a file lookup per architecture: about a second over the whole zoo
        names = [name for name in names if find_weights(settings, name).file is not None]
    page = names[offset : offset + limit]
    items = []
    for architecture in page:
        num_params, input_size = model_shape(architecture)
        weights = find_weights(settings, architecture)
        items.append(
            {
                "name": architecture,
                "pretrained_tags": pretrained_tags(architecture),
                "num_params": num_params,
                "input_size": input_size,
                "weights_available": weights.file is not None,
                "weights_source": weights.source,
            }
        )
    return len(names), items
