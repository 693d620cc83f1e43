"""The model family: ModelPublic, ModelsPublic (an upload is multipart, not a ModelCreate)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    sha256: str
    size_bytes: int
    created_at: datetime
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    op_histogram: dict[str, int]
    parameter_count: int
    producer: str = ""


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int
