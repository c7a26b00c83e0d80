"""/v1/models: the registry (models, versions, aliases, downloads, exports). HTTP to
`app.models.service`; predictions are in `app.serving.router`."""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from app.core.auth import ReadKey, TrainKey
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import AliasName, ModelName
from app.core.pagination import PageDep
from app.core.storage import remove_quietly
from app.db.tables import Export, Model
from app.models import service
from app.models.dependencies import ModelDep
from app.models.schemas import (
    AliasOut,
    AliasUpdate,
    ExportCreate,
    ExportFormat,
    ExportOut,
    ModelList,
    ModelOut,
    ValidationPredictions,
)

router = APIRouter(prefix="/v1/models", tags=["models"])


def _out(session: Session, model: Model) -> ModelOut:
    return ModelOut.model_validate({**model.__dict__, "aliases": service.aliases_of(session, model)})


@router.get("", response_model=ModelList)
def list_models(principal: ReadKey, session: SessionDep, page: PageDep) -> ModelList:
    found = service.list_models(session, principal.tenant_id, page.limit, page.after)
    return ModelList(data=[_out(session, model) for model in found])


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model: ModelDep, _: ReadKey, session: SessionDep) -> ModelOut:
    return _out(session, model)


@router.get("/{model_id}/validation-predictions", response_model=ValidationPredictions)
def list_validation_predictions(
    model: ModelDep, _: ReadKey, session: SessionDep,
    wrong: Annotated[bool, Query(description="Only the misclassified images, most confident first.")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict:  # fmt: skip
    """Each image of the validation split its job measured the model on, as the model predicted it
    (in the split's order): the dataset's own val/ images, or the stratified hold-out of its train/
    images. Empty for a model registered before these were kept."""
    return {"dataset_id": model.dataset_id, "data": service.validation_predictions(session, model, wrong, limit)}


@router.put("/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(
    name: ModelName, alias: AliasName, request: AliasUpdate, principal: TrainKey, session: SessionDep, http: Request
) -> AliasOut:
    """Point an alias at a version, atomically: each request is answered by the old or the new model
    (with several API processes, the others answer by the new one within `lookup_cache_seconds`)."""
    pointer = service.set_alias(session, principal.tenant_id, name, alias, request.version)
    http.app.state.model_lookup.clear()
    return AliasOut(name=name, alias=alias, version=request.version, model_id=pointer.model_id)


@router.delete("/{name}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(name: ModelName, alias: AliasName, principal: TrainKey, session: SessionDep, request: Request) -> None:
    service.delete_alias(session, principal.tenant_id, name, alias)
    request.app.state.model_lookup.clear()


@router.get("/{model_id}/download", response_class=FileResponse)
def download_model(model: ModelDep, _: ReadKey) -> FileResponse:
    path = service.zip_artifact(get_settings(), model)
    return FileResponse(
        path, media_type="application/zip", filename=f"{model.id}.zip", background=BackgroundTask(remove_quietly, path)
    )


@router.post(
    "/{model_id}/exports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExportOut,
    responses={200: {"model": ExportOut, "description": "The model already has this export (ready or in the making)"}},
)
def create_export(model: ModelDep, body: ExportCreate, _: TrainKey, session: SessionDep, response: Response) -> Export:
    """Queue an ONNX export for a worker (normalisation and calibration inside). `onnx` (fp32) is
    kept only if onnxruntime matches PyTorch on the validation images (top-1 agreement 100%,
    probabilities within 1e-4); `onnx-int8` (static quantization calibrated on the model's training
    images) only if its top-1 agrees with PyTorch on at least 99% of them and its accuracy is at
    most 0.5 points lower. Poll GET /v1/models/{ref}/exports/{format}. A model has one export per
    format: asking again returns it (200), and a failed one is tried again."""
    export, queued = service.request_export(session, model, body.format)
    if not queued:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/models/{model.id}/exports/{export.format}"
    return export


@router.get("/{model_id}/exports/{format}", response_model=ExportOut)
def get_export(model: ModelDep, format: ExportFormat, _: ReadKey, session: SessionDep) -> Export:
    return service.get_export(session, model, format)


@router.get("/{model_id}/exports/{format}/download", response_class=FileResponse)
def download_export(model: ModelDep, format: ExportFormat, _: ReadKey, session: SessionDep) -> FileResponse:
    path = service.existing_export(get_settings(), session, model, format)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model.id}.{'int8.' if format == 'onnx-int8' else ''}onnx")


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(model: ModelDep, _: TrainKey, session: SessionDep, request: Request) -> None:
    service.delete_model(session, get_settings(), model)
    request.app.state.model_lookup.clear()
    request.app.state.serving.unload(model.id)
