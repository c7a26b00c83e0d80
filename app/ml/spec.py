"""What a fine-tune is asked to do: strategy and hyperparameters in timm's vocabulary, and the
rules that fill in what the caller left to "auto" from the dataset's size and the device.

Field names follow timm's train.py arguments so that timm users need no new vocabulary.
"""

import math
import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.data import create_transform
from timm.optim import list_optimizers

Strategy = Literal["linear_probe", "partial", "full", "lp_ft"]
# What a job may ask for: one flat enum in the OpenAPI document (a union of a const and an enum
# trips generated clients such as openapi-python-client's).
RequestedStrategy = Literal["auto", "linear_probe", "partial", "full", "lp_ft"]
STRATEGIES: tuple[str, ...] = ("linear_probe", "partial", "full", "lp_ft")
Metric = Literal["val_accuracy", "macro_f1", "val_loss"]

# Per-strategy starting points, for batch size 32 (rescaled below for other batch sizes).
# A probe trains a zero-initialised linear head on frozen features: many cheap epochs at a high
# rate. Moving pretrained weights wants a rate an order of magnitude lower and few epochs.
RECIPES: dict[str, dict[str, Any]] = {
    "linear_probe": {"epochs": 30, "lr": 2e-3},
    "partial": {"epochs": 6, "lr": 5e-4},
    "full": {"epochs": 6, "lr": 2e-4},
    "lp_ft": {"epochs": 4, "lr": 1e-4, "lp_epochs": 30},
}
RECIPE_BATCH_SIZE = 32


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    metric: Metric = "val_loss"
    patience: int = Field(3, ge=1, le=100)
    min_delta: float = Field(0.0, ge=0)


class Hyperparameters(BaseModel):
    """Unset (null) fields are chosen automatically; the job records the values actually used."""

    model_config = ConfigDict(extra="forbid", strict=True)

    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    opt: str = Field("adamw", description="Any optimizer name timm.optim.create_optimizer_v2 accepts.")
    lr: float | None = Field(
        None, gt=0, le=10, description="Unset: the strategy's rate, scaled to batch_size x grad_accum_steps."
    )
    weight_decay: float = Field(0.01, ge=0, le=1)
    sched: Literal["cosine", "tanh", "step", "multistep", "poly"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, le=100)
    smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing.")
    mixup: float = Field(0.0, ge=0, le=10, description="Mixup alpha; 0 turns it off.")
    cutmix: float = Field(0.0, ge=0, le=10, description="CutMix alpha; 0 turns it off.")
    aa: str | None = Field(None, description="timm AutoAugment/RandAugment policy, e.g. 'rand-m9-mstd0.5'.")
    reprob: float = Field(0.0, ge=0, le=1, description="Random erasing probability.")
    drop_path_rate: float | None = Field(None, ge=0, lt=1)
    model_ema: bool = False
    model_ema_decay: float = Field(0.998, gt=0, lt=1)
    layer_decay: float | None = Field(None, gt=0, le=1)
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    amp: bool | None = Field(None, description="Mixed precision. Unset: on where the device runs bf16/fp16 fast.")
    channels_last: bool | None = Field(None, description="Unset: on (faster for convolutions on CPU and GPU).")
    img_size: int | None = Field(None, ge=32, le=1024, description="Unset: the backbone's pretrained input size.")
    class_weighting: Literal["none", "auto", "sampler"] = Field(
        "none", description="'auto': loss weighted by inverse class frequency; 'sampler': class-balanced sampling."
    )
    early_stopping: EarlyStopping | None = None
    eval_metric: Metric = Field("val_accuracy", description="Picks the epoch whose weights are kept.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each class held out for validation when the dataset has no val split."
    )
    unfreeze_stages: int = Field(2, ge=1, le=100, description="'partial': how many of the last stages train.")
    lp_epochs: int | None = Field(None, ge=1, le=1000, description="'lp_ft': epochs of the linear-probe phase.")
    flip_views: bool = Field(False, description="Linear probe: also learn from features of mirrored images.")
    workers: int | None = Field(None, ge=0, le=64, description="Data loading processes. Unset: chosen per device.")
    image_cache: bool = Field(True, description="Decode each image once and keep it, resized, in memory.")

    @field_validator("opt")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value.lower() not in list_optimizers():
            raise ValueError(f"unknown optimizer '{value}'; timm knows: {', '.join(list_optimizers())}")
        return value.lower()

    @field_validator("aa")
    @classmethod
    def _known_augment(cls, value: str | None) -> str | None:
        if value:
            try:  # timm parses the policy string; let it say what is wrong with it
                create_transform(64, is_training=True, auto_augment=value)
            except Exception as exc:
                raise ValueError(f"not a timm augmentation policy: {exc}") from exc
        return value or None

    @model_validator(mode="after")
    def _consistent(self) -> "Hyperparameters":
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        if (self.mixup or self.cutmix) and self.class_weighting == "auto":
            raise ValueError("class_weighting 'auto' cannot weight mixed labels; use 'sampler' with mixup/cutmix")
        return self


class AutoOptions(BaseModel):
    """How `strategy: "auto"` measures its candidates (app/ml/auto.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    budget_seconds: float = Field(
        60, ge=0, le=86_400,
        description="Time for measuring candidates by cross-validation on the training split, on top of training "
        "the winner. The requested backbone's linear probe is always measured (its features serve the final "
        "training too); a candidate whose estimated cost exceeds what is left is skipped, and the job says so. "
        "0: the linear probe, unmeasured.",
    )  # fmt: skip
    other_backbones: bool = Field(
        True, description="Also measure the linear probes of the other backbones whose weights this service holds "
        "locally; one of them may then be trained instead of the requested backbone.",
    )  # fmt: skip


def bf16_fast_on_cpu() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve(hp: Hyperparameters, strategy: str) -> Hyperparameters:
    """Fill the automatic fields that depend on the strategy (known when the job is created)."""
    recipe = RECIPES[strategy]
    updates: dict[str, Any] = {}
    if hp.epochs is None:
        updates["epochs"] = max(recipe["epochs"], hp.warmup_epochs + 1)
    if hp.lr is None:
        ratio = hp.batch_size * hp.grad_accum_steps / RECIPE_BATCH_SIZE
        # timm's rule for scaling lr with batch size: square root for adaptive optimizers, linear for SGD.
        adaptive = any(name in hp.opt for name in ("adam", "lamb", "lion", "adan", "ada", "nadam", "rmsprop"))
        updates["lr"] = recipe["lr"] * (math.sqrt(ratio) if adaptive else ratio)
    if strategy == "lp_ft" and hp.lp_epochs is None:
        updates["lp_epochs"] = recipe["lp_epochs"]
    return hp.model_copy(update=updates)


def resolve_for_device(hp: Hyperparameters, device_type: str) -> Hyperparameters:
    """Fill the automatic fields that depend on the device (known when a worker starts the job)."""
    updates: dict[str, Any] = {}
    if hp.amp is None:
        # On a CPU with bf16, it pays wherever the network runs: training (bench/full_throughput.py)
        # and a probe's feature pass alike. Probe features in bf16 made the probe job 1.75x faster
        # on trashnet, at the same validation accuracy within one image (bench/SPEED.md). What is
        # reported is measured in fp32 either way, as served (train.py's _finish).
        cpu_bf16 = device_type == "cpu" and bf16_fast_on_cpu()
        updates["amp"] = device_type == "cuda" or cpu_bf16
    if hp.channels_last is None:
        updates["channels_last"] = True
    if hp.workers is None:
        # On a GPU, loading must keep up with a fast device; on a CPU the same cores also compute.
        cores = os.cpu_count() or 1
        updates["workers"] = min(8, cores - 1) if device_type == "cuda" else min(4, max(1, cores // 2))
    return hp.model_copy(update=updates)


def total_epochs(strategy: str, hp: Hyperparameters) -> int:
    return hp.epochs + (hp.lp_epochs if strategy == "lp_ft" else 0)
