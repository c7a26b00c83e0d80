from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.ids import DATASET_ID, NAME
from app.ml.spec import AutoOptions, Hyperparameters, RequestedStrategy

JobStatus = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]


Accelerator = Literal["any", "gpu", "cpu"]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset_id: str = Field(pattern=DATASET_ID)
    backbone: str = Field(max_length=200, examples=["mobilenetv2_100", "resnet50.a1_in1k"])
    strategy: RequestedStrategy = Field(
        "auto", description="'auto': a worker trains the requested backbone's linear probe and serves it at once (the "
        "job's `model_id` while it runs), measures it by cross-validation on the training split, then, within "
        "`auto.budget_seconds`, measures other candidates (other local backbones, 'partial', 'lp_ft') the same way; if one beats the probe "
        "beyond noise it is trained and becomes the job's model, a second one. The job records every candidate's "
        "score and time, and why the winner won.",
    )  # fmt: skip
    auto: AutoOptions = Field(default_factory=AutoOptions, description="Only with strategy 'auto'.")
    pretrained: bool = Field(True, description="false trains from random initialisation.")
    accelerator: Accelerator = Field(
        "any", description="Which workers may run it: 'gpu' waits for a GPU worker (and says so in its events "
        "while none is running), 'cpu' for a CPU one, 'any' the first free."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    model_name: str | None = Field(
        None,
        pattern=f"^{NAME}$",
        description="Name of the model this job produces; models of one name get versions 1, 2, ... "
        "Unset: '<dataset name>-<architecture>', so retraining the same backbone on the same data adds a version.",
    )

    @model_validator(mode="after")
    def _auto_options_need_auto(self) -> "JobCreate":
        if "auto" in self.model_fields_set and self.strategy != "auto":
            raise ValueError(f"'auto' options apply to strategy 'auto' only, not '{self.strategy}'")
        return self


class Progress(BaseModel):
    epoch: int = Field(description="Epochs done.")
    epochs: int = Field(description="Epochs in all (0 while 'auto' has not chosen).")
    phase: Literal["queued", "searching", "preparing", "features", "training", "validation", "paused", "succeeded",
                   "failed", "cancelled"] = Field(
        description="searching: 'auto' measures candidates; preparing: building the model and decoding the images; "
        "features: a linear probe's backbone pass; then training and validation of each epoch."
    )  # fmt: skip
    step: int | None = Field(None, description="Batches done in the current phase's pass (running jobs).")
    steps: int | None = Field(None, description="Batches in the current phase's pass.")
    images_per_second: float | None = Field(None, description="Measured throughput of the current phase.")
    eta_seconds: float | None = Field(None, description="Seconds left, from the measured throughput; null until known.")
    queue_position: int | None = Field(None, description="Queued jobs only: 1 when it is next.")


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    dataset_id: str | None
    backbone: str = Field(description="The backbone trained: 'auto' may have chosen another one than requested.")
    strategy: RequestedStrategy = Field(description="'auto' until a worker has measured and chosen.")
    strategy_reason: str | None = Field(description="Why 'auto' chose this strategy; null when it was asked for.")
    search: dict[str, Any] | None = Field(
        description="'auto' only: its options, then (once chosen) every candidate measured or skipped, with "
        "out-of-fold accuracy, its 95% interval and seconds, the probe's learning curve, the winner and why."
    )
    pretrained: bool
    accelerator: str
    model_name: str | None
    hyperparameters: dict[str, Any]
    seed: int
    status: JobStatus
    progress: Progress
    metrics: dict[str, Any] = Field(
        description="While running: the latest epoch's. Once succeeded: those of the kept weights (best epoch), "
        "measured as they are served; each accuracy with its Wilson 95% interval for `val_images` (`*_ci95`)."
    )
    model_id: str | None = Field(
        description="The job's model once it has one: with 'auto', the linear probe it serves while it searches, "
        "then the winner's model if another candidate won (the probe's model stays registered)."
    )
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
