from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.core.errors import ErrorBody


class ClassCount(BaseModel):
    name: str
    train: int
    val: int


class DatasetOut(BaseModel):
    id: str
    name: str
    status: Literal["processing", "ready", "failed"] = Field(
        description="processing: a worker is checking and unpacking the archive; ready: usable by jobs; "
        "failed: refused, `error` says why (nothing of it is kept)."
    )
    num_images: int
    classes: list[ClassCount]
    has_val_split: bool
    archive_bytes: int = Field(description="The archive as uploaded.")
    size_bytes: int = Field(description="What the dataset takes of the storage quota: the images kept once ready.")
    sha256: str = Field(description="Of the archive as uploaded.")
    created_at: datetime
    finished_at: datetime | None
    warnings: list[str]
    error: ErrorBody | None


class AuditOut(BaseModel):
    id: str
    dataset_id: str
    backbone: str = Field(description="Whose pooled features the images are compared with.")
    status: Literal["processing", "ready", "failed"]
    result: dict[str, Any] | None = Field(
        description="Once ready: `summary` (counts), `cross_validated_accuracy` (of a linear classifier on the "
        "features, out of fold), and the findings, each naming its files: `exact_duplicates` and `near_duplicates` "
        "(`leak`: in train and val), `likely_mislabelled` (out-of-fold predictions disagreeing with the label, most "
        "confident first), `confused_classes`, `outliers`."
    )
    error: ErrorBody | None
    created_at: datetime
    finished_at: datetime | None


class DatasetList(BaseModel):
    data: list[DatasetOut]


class ImageOut(BaseModel):
    path: str = Field(
        description="Relative to the dataset's root, '/'-separated: `<split>/<class>/<file>` (e.g. "
        "`train/bees/1.jpg`; deeper when the upload had folders inside a class folder). Its thumbnail: "
        "GET /v1/datasets/{dataset_id}/images/{path}."
    )
    label: str = Field(description="Its class.")
    split: Literal["train", "val"] = Field(
        description="Where the dataset keeps it: `val` only when the upload had its own val/ (or valid/, validation/) "
        "split. A dataset without one keeps every image in train/, and a job holds out a stratified share of those "
        "for validation."
    )


class ImageList(BaseModel):
    data: list[ImageOut]
