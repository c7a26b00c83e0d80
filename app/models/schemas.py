from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.errors import ErrorBody
from app.core.ids import BIGINT_MAX


ExportFormat = Literal["onnx", "onnx-int8"]  # fp32 ONNX, and its int8 quantization


class ModelOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    name: str
    version: int
    aliases: list[str]
    job_id: str
    dataset_id: str
    backbone: str
    strategy: str = Field(description="How the backbone was adapted: linear_probe, partial, full or lp_ft.")
    classes: list[str]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    size_bytes: int
    created_at: datetime


class ModelList(BaseModel):
    data: list[ModelOut]


class ValidationPrediction(BaseModel):
    path: str = Field(
        description="The image, relative to the dataset's root as GET /v1/datasets/{dataset_id}/images lists it "
        "(and serves its thumbnail at GET /v1/datasets/{dataset_id}/images/{path})."
    )
    label: str = Field(description="Its true class.")
    predicted: str = Field(description="The model's top-1 class.")
    confidence: float = Field(
        description="The calibrated probability of `predicted`: softmax(logits / temperature), as the job measured it."
    )


class ValidationPredictions(BaseModel):
    dataset_id: str = Field(description="The dataset whose images these are.")
    data: list[ValidationPrediction]


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: ExportFormat = "onnx"


class ExportOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), from_attributes=True)

    id: str
    model_id: str
    format: ExportFormat
    status: Literal["processing", "ready", "failed"] = Field(
        description="processing: a worker is building and checking it; ready: download it from "
        "/v1/models/{ref}/exports/{format}/download; failed: `error` says why (POST again to retry)."
    )
    size_bytes: int
    parity: dict[str, Any] | None = Field(
        description="On the model's validation images: images, max_abs_prob_diff, top1_agreement, passed, and for "
        "onnx opset, for onnx-int8 calibration_images, accuracy_fp32 and accuracy_int8."
    )
    error: ErrorBody | None
    created_at: datetime
    finished_at: datetime | None


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: int = Field(ge=1, le=BIGINT_MAX)


class AliasOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    alias: str
    version: int
    model_id: str
