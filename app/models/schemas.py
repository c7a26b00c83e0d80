from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModelOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    job_id: str
    dataset_id: str
    backbone: str
    classes: list[str]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any]
    size_bytes: int
    created_at: datetime


class ModelList(BaseModel):
    data: list[ModelOut]


class LabelScore(BaseModel):
    label: str
    score: float


class ImagePrediction(BaseModel):
    filename: str
    labels: list[LabelScore]


class PredictionResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    predictions: list[ImagePrediction]
