from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class ClassCount(BaseModel):
    name: str
    train: int
    val: int


class DatasetOut(BaseModel):
    id: str
    name: str
    status: Literal["ready"]
    num_images: int
    classes: list[ClassCount]
    has_val_split: bool
    size_bytes: int
    sha256: str
    created_at: datetime
    warnings: list[str]


class DatasetList(BaseModel):
    data: list[DatasetOut]
