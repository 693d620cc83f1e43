"""/v1/methods: the pruning methods this server runs, with each one's params schema."""

from __future__ import annotations

from fastapi import APIRouter

from app.features.methods import service
from app.features.methods.schemas import MethodsPublic

router = APIRouter()


@router.get("/v1/methods", response_model=MethodsPublic, tags=["methods"])
def get_methods() -> MethodsPublic:
    return service.catalog()
