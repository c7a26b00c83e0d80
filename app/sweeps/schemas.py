from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.ids import DATASET_ID
from app.ml.spec import Hyperparameters, RequestedStrategy


class SweepCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset_id: str = Field(pattern=DATASET_ID)
    backbones: list[str] = Field(min_length=1, max_length=20, examples=[["mobilenetv2_100", "tf_efficientnet_lite0"]])
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("backbones")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if len(set(names)) != len(names):
            raise ValueError("backbones must be distinct")
        return names


class SweepRow(BaseModel):
    rank: int | None = Field(description="1 = best validation accuracy; null until the row has succeeded.")
    backbone: str
    job_id: str
    status: str
    val_accuracy: float | None
    val_accuracy_ci95: list[float] | None = Field(description="The Wilson 95% interval of val_accuracy for its validation size.")
    val_images: int | None
    macro_f1: float | None
    seconds: float | None = Field(description="Wall time of the row's linear probe, features included.")
    num_params: int
    model_id: str | None
    error: str | None


class SweepOut(BaseModel):
    id: str
    dataset_id: str | None
    status: Literal["queued", "running", "finished"]
    rows: list[SweepRow]
    created_at: datetime


class SweepList(BaseModel):
    data: list[SweepOut]


class Promote(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    backbone: str = Field(description="A backbone of the sweep's table.")
    strategy: RequestedStrategy = "auto"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = Field(0, ge=0, le=2**31 - 1)
