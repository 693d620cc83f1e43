"""The method catalog as the API shows it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class MethodPublic(BaseModel):
    name: str
    summary: str
    paper: str
    tasks: list[str]
    params_schema: dict[str, Any]


class MethodsPublic(BaseModel):
    data: list[MethodPublic]
    count: int
