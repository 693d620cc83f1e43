"""/v1/datasets: .npz arrays or image-folder archives, validated like the engine loads them."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.features.datasets import service
from app.features.datasets.schemas import DatasetPublic
from app.features.files.router import add_file_routes, upload_responses
from app.features.files.schemas import multipart_body
from app.features.files.service import UploaderDep

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    summary="Upload a dataset (multipart field 'file'; optional fields task, image_size, grayscale)",
    description="201 for a new dataset; 200 with the existing one when this tenant already "
    "uploaded the same bytes.",
    responses=upload_responses(DatasetPublic),
    openapi_extra=multipart_body(
        task={"type": "string", "enum": ["classification", "language_modeling"]},
        image_size={"type": "string", "example": "32,32"},
        grayscale={"type": "boolean"},
    ),
)
async def upload_dataset(response: Response, uploader: UploaderDep) -> DatasetPublic:
    kind = service.upload_kind(uploader.settings)
    return service.to_public(await uploader.receive(kind, response, "/v1/datasets"))


add_file_routes(router, service.RESOURCE)
