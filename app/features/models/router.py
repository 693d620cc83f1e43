"""/v1/models: ONNX uploads (streamed, validated without torch, deduplicated by sha256)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.features.files.router import add_file_routes, upload_responses
from app.features.files.schemas import multipart_body
from app.features.files.service import UploaderDep
from app.features.models import service
from app.features.models.schemas import ModelPublic

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    summary="Upload an ONNX model (multipart field 'file')",
    description="An .onnx file, or a .zip holding one .onnx and the external-data file(s) it "
    "names (e.g. model.onnx + model.onnx.data), stored as the one self-contained .onnx it makes. "
    "201 for a new model; 200 with the existing model when this tenant already uploaded the same "
    "model (sha256 of the stored .onnx).",
    responses=upload_responses(ModelPublic),
    openapi_extra=multipart_body(),
)
async def upload_model(response: Response, uploader: UploaderDep) -> ModelPublic:
    kind = service.upload_kind(uploader.settings)
    return service.to_public(await uploader.receive(kind, response, "/v1/models"))


add_file_routes(router, service.RESOURCE)
