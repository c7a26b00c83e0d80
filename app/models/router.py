from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from app.core.config import get_settings
from app.core.db import get_session
from app.core.errors import Invalid
from app.core.storage import remove_quietly
from app.db.tables import Model
from app.models import service
from app.models.schemas import ModelList, ModelOut, PredictionResponse
from app.serving import predictor

router = APIRouter(prefix="/v1/models", tags=["models"])
SessionDep = Annotated[Session, Depends(get_session)]


def _model(model_id: str, session: SessionDep) -> Model:
    return service.get_model(session, model_id)


ModelDep = Annotated[Model, Depends(_model)]


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    return {"data": service.list_models(session, limit)}


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model: ModelDep) -> Model:
    return model


@router.get("/{model_id}/download", response_class=FileResponse)
def download_model(model: ModelDep) -> FileResponse:
    path = service.zip_artifact(get_settings(), model)
    return FileResponse(
        path, media_type="application/zip", filename=f"{model.id}.zip", background=BackgroundTask(remove_quietly, path)
    )


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(model: ModelDep, session: SessionDep, request: Request) -> None:
    service.delete_model(session, get_settings(), model)
    request.app.state.model_cache.evict(model.id)


@router.post("/{model_id}/predict", response_model=PredictionResponse)
async def predict(
    model: ModelDep,
    request: Request,
    files: Annotated[list[UploadFile], File(description="One or more images.")],
    top_k: Annotated[int | None, Query(ge=1, description="Default: min(5, number of classes).")] = None,
) -> PredictionResponse:
    settings = get_settings()
    if len(files) > settings.max_predict_files:
        raise Invalid(f"{len(files)} files sent; at most {settings.max_predict_files} per request.", code="too_many_files")
    num_classes = len(model.classes)
    top_k = top_k or min(5, num_classes)
    if top_k > num_classes:
        raise Invalid(f"top_k={top_k} but the model has {num_classes} classes.", code="top_k_too_large")
    payloads = [(upload.filename or f"file{i}", await upload.read()) for i, upload in enumerate(files)]
    images = await run_in_threadpool(
        lambda: [predictor.decode_image(name, data, settings.max_image_pixels) for name, data in payloads]
    )
    loaded = await run_in_threadpool(request.app.state.model_cache.get, model.id, service.artifact_dir(settings, model))
    results = await run_in_threadpool(predictor.predict, loaded, images, top_k)
    return PredictionResponse(
        model_id=model.id,
        predictions=[
            {"filename": name, "labels": [{"label": label, "score": score} for label, score in labels]}
            for (name, _), labels in zip(payloads, results, strict=True)
        ],
    )
