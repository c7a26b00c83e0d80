from datetime import datetime
from typing import Literal

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


class DatasetList(BaseModel):
    data: list[DatasetOut]
