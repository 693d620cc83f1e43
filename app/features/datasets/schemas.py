"""The dataset family: DatasetPublic, DatasetsPublic (an upload is multipart)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: str = Field(description=".npz, .zip, .tar or .tar.gz")
    sha256: str
    size_bytes: int
    created_at: datetime
    task: str
    train: int
    test: int
    sample_shape: list[int]
    x_dtype: str
    num_classes: int
    classes: list[str] | None = None


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
