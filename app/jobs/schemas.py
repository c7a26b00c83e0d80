from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from timm.optim import list_optimizers

Strategy = Literal["linear_probe", "full"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

# Defaults that depend on the strategy: a probe trains only a linear head on cached features, so
# many cheap epochs at a higher rate; a full fine-tune moves pretrained weights, so few epochs and
# a lower rate.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear_probe": {"epochs": 20, "lr": 1e-3},
    "full": {"epochs": 5, "lr": 3e-4},
}


class Hyperparameters(BaseModel):
    """Names follow timm's train.py arguments. Unset `epochs`/`lr` take the strategy's default."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(None, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=1024)
    lr: float | None = Field(None, gt=0, le=10)
    opt: str = Field("adamw", description="Any optimizer name timm.optim.create_optimizer_v2 knows.")
    weight_decay: float = Field(0.01, ge=0, le=1)
    sched: Literal["cosine", "tanh", "step", "multistep", "poly"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, le=100)
    smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each class held out for validation when the dataset has no val split."
    )

    @field_validator("opt")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value.lower() not in list_optimizers():
            raise ValueError(f"unknown optimizer '{value}'; timm knows: {', '.join(list_optimizers())}")
        return value.lower()

    def resolved(self, strategy: str) -> "Hyperparameters":
        defaults = STRATEGY_DEFAULTS[strategy]
        return self.model_copy(
            update={name: value for name, value in defaults.items() if getattr(self, name) is None}
        )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(max_length=40)
    backbone: str = Field(max_length=200, examples=["mobilenetv2_100", "resnet50.a1_in1k"])
    strategy: Strategy = "linear_probe"
    pretrained: bool = Field(True, description="false trains from random initialisation.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _warmup_shorter_than_training(self) -> "JobCreate":
        resolved = self.hyperparameters.resolved(self.strategy)
        if resolved.warmup_epochs >= resolved.epochs:
            raise ValueError("hyperparameters.warmup_epochs must be smaller than hyperparameters.epochs")
        return self


class Progress(BaseModel):
    epoch: int
    epochs: int


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    dataset_id: str | None
    backbone: str
    strategy: Strategy
    pretrained: bool
    hyperparameters: dict[str, Any]
    seed: int
    status: JobStatus
    progress: Progress
    metrics: dict[str, Any]
    model_id: str | None
    error: JobError | None
    worker: str | None = Field(description="host:pid of the worker process that holds or held the job.")
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    data: list[JobOut]


class JobEventOut(BaseModel):
    id: int
    type: str
    message: str
    data: dict[str, Any]
    created_at: datetime


class JobEventList(BaseModel):
    data: list[JobEventOut]
