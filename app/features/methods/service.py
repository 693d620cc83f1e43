"""The one place the API touches the method catalog: `methods.registry`, torch-free (params
and applicability; each method's `impl` is never imported here)."""

from __future__ import annotations

from app.features.methods.schemas import MethodPublic, MethodsPublic
from methods.registry import check_applicable, list_methods, validate_params

__all__ = ["check_applicable", "list_methods", "validate_params", "catalog"]


def catalog() -> MethodsPublic:
    data = [MethodPublic(**m.describe()) for m in list_methods()]
    return MethodsPublic(data=data, count=len(data))
