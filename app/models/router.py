import time
from typing import Annotated, Any

import anyio
import torch
from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from app.core.auth import AnyKey, PredictKey, ReadKey, TrainKey
from app.core.config import get_settings
from app.core.db import SessionDep, new_session
from app.core.errors import Invalid, NotFound
from app.core.ids import AliasName, ModelName, ModelRef
from app.core.storage import OWN_BODY_LIMIT, capped_body, parse_multipart, remove_quietly
from app.db.tables import Model
from app.models import service
from app.models.schemas import (
    AliasOut,
    AliasUpdate,
    EmbeddingResponse,
    ExportCreate,
    ExportOut,
    ImagesBody,
    ModelList,
    ModelOut,
    PredictionResponse,
)
from app.serving import predictor
from app.serving.predictor import LoadedModel

router = APIRouter(prefix="/v1/models", tags=["models"])


def _model(model_id: ModelRef, principal: AnyKey) -> Model:
    # A session of its own, closed at once: a prediction must not hold a database connection
    # while it waits for its forward pass (16 waiting requests would drain the pool).
    with new_session() as session:
        return service.get_model(session, principal.tenant_id, model_id)


ModelDep = Annotated[Model, Depends(_model)]


def _out(session: Session, model: Model) -> ModelOut:
    return ModelOut.model_validate({**model.__dict__, "aliases": service.aliases_of(session, model)})


@router.get("", response_model=ModelList)
def list_models(principal: ReadKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ModelList:
    return ModelList(data=[_out(session, model) for model in service.list_models(session, principal.tenant_id, limit)])


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model: ModelDep, _: ReadKey, session: SessionDep) -> ModelOut:
    return _out(session, model)


@router.put("/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(name: ModelName, alias: AliasName, request: AliasUpdate, principal: TrainKey, session: SessionDep) -> AliasOut:
    """Point an alias at a version, atomically: each request is answered by the old or the new model."""
    pointer = service.set_alias(session, principal.tenant_id, name, alias, request.version)
    return AliasOut(name=name, alias=alias, version=request.version, model_id=pointer.model_id)


@router.delete("/{name}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT)
def delete_alias(name: ModelName, alias: AliasName, principal: TrainKey, session: SessionDep) -> None:
    service.delete_alias(session, principal.tenant_id, name, alias)


@router.get("/{model_id}/download", response_class=FileResponse)
def download_model(model: ModelDep, _: ReadKey) -> FileResponse:
    path = service.zip_artifact(get_settings(), model)
    return FileResponse(
        path, media_type="application/zip", filename=f"{model.id}.zip", background=BackgroundTask(remove_quietly, path)
    )


@router.post(
    "/{model_id}/exports",
    status_code=status.HTTP_201_CREATED,
    response_model=ExportOut,
    responses={200: {"model": ExportOut, "description": "The model already had this export: returned as is"}},
)
async def create_export(
    model: ModelDep, body: ExportCreate, _: TrainKey, session: SessionDep, request: Request, response: Response
) -> dict:
    """ONNX with the normalisation and calibration inside; kept only if onnxruntime matches PyTorch
    on the validation images (top-1 agreement 100%, probabilities within 1e-4)."""
    export, created = await run_in_threadpool(service.export_onnx, session, get_settings(), model)
    if created:
        request.app.state.model_cache.evict(model.id)  # the next prediction may run on the export
    else:
        response.status_code = status.HTTP_200_OK
    return export


@router.get("/{model_id}/exports/onnx", response_class=FileResponse)
def download_export(model: ModelDep, _: ReadKey) -> FileResponse:
    path = service.exports_dir(get_settings(), model) / "model.onnx"
    if not path.exists():
        raise NotFound(f"Model '{model.id}' has no ONNX export yet: POST /v1/models/{model.id}/exports.",
                       code="export_not_found")  # fmt: skip
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model.id}.onnx")


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(model: ModelDep, _: TrainKey, session: SessionDep, request: Request) -> None:
    service.delete_model(session, get_settings(), model)
    request.app.state.model_cache.evict(model.id)


def _inline_refs(schema: dict) -> dict:
    """Pydantic's schema with its local `$defs` substituted in place: `openapi_extra` is copied into
    the OpenAPI document as is, where `#/$defs/...` would not resolve."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(schema)


IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {"schema": _inline_refs(ImagesBody.model_json_schema())},
        },
    }
}


async def read_images(request: Request) -> list[tuple[str, bytes]]:
    """Images from a multipart body (field `files`, one or more) or JSON (base64), within limits."""
    settings = get_settings()
    if request.headers.get("content-type", "").startswith("application/json"):
        body = b"".join([chunk async for chunk in capped_body(request, settings.max_predict_bytes)])
        try:
            images = [(image.filename, image.data) for image in ImagesBody.model_validate_json(body).images]
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise Invalid(f"Invalid JSON body at {where}: {first['msg']}", code="validation_error") from exc
    else:
        form = await parse_multipart(request, settings.max_predict_bytes, settings.max_predict_files)
        try:
            uploads = [item for key, item in form.multi_items() if key == "files" and isinstance(item, UploadFile)]
            images = [(upload.filename or f"file{i}", await upload.read()) for i, upload in enumerate(uploads)]
        finally:
            await form.close()
        if not images:
            raise Invalid("Send one or more images in the multipart field 'files'.", code="missing_file")
    if len(images) > settings.max_predict_files:
        raise Invalid(f"{len(images)} images sent; at most {settings.max_predict_files} per request.", code="too_many_files")
    return images


async def _prepare(request: Request, model: Model) -> tuple[list[tuple[str, bytes]], LoadedModel, torch.Tensor]:
    settings = get_settings()
    images = await read_images(request)
    cache = request.app.state.model_cache
    loaded = cache.cached(model.id) or await run_in_threadpool(
        cache.get, model.id, service.artifact_dir(settings, model), service.exports_dir(settings, model) / "model.onnx"
    )
    batch = await anyio.to_thread.run_sync(
        predictor.preprocess, loaded, images, settings.max_image_pixels, limiter=request.app.state.preprocess_limiter
    )
    return images, loaded, batch


def _timed(response: Response, started: float) -> None:
    milliseconds = (time.perf_counter() - started) * 1000
    response.headers["Server-Timing"] = f"inference;dur={milliseconds:.1f}"


@router.post(
    "/{model_id}/predict",
    response_model=PredictionResponse,
    openapi_extra=IMAGES_BODY,
    max_body_size=OWN_BODY_LIMIT,  # max_predict_bytes, in read_images
)
async def predict(
    model: ModelDep,
    _: PredictKey,
    request: Request,
    response: Response,
    top_k: Annotated[int | None, Query(ge=1, description="Default: min(5, number of classes).")] = None,
    threshold: Annotated[
        float | None, Query(ge=0, le=1, description="Answer null for an image whose top probability is below this.")
    ] = None,
) -> PredictionResponse:
    started = time.perf_counter()
    num_classes = len(model.classes)
    top_k = top_k or min(5, num_classes)
    if top_k > num_classes:
        raise Invalid(f"top_k={top_k} but the model has {num_classes} classes.", code="top_k_too_large")
    images, loaded, batch = await _prepare(request, model)
    results, batch_size = await predictor.predict(loaded, batch, top_k, threshold)
    _timed(response, started)
    response.headers["X-Batch-Size"] = str(batch_size)
    response.headers["X-Runtime"] = loaded.runtime
    return PredictionResponse(
        model_id=model.id,
        predictions=[
            {"filename": name, "labels": None if labels is None else [{"label": l, "score": s} for l, s in labels]}
            for (name, _), labels in zip(images, results, strict=True)
        ],
    )


@router.post(
    "/{model_id}/embed",
    response_model=EmbeddingResponse,
    openapi_extra=IMAGES_BODY,
    max_body_size=OWN_BODY_LIMIT,  # max_predict_bytes, in read_images
)
async def embed(model: ModelDep, _: PredictKey, request: Request, response: Response) -> EmbeddingResponse:
    """The pooled features (the classifier's input) of each image."""
    started = time.perf_counter()
    images, loaded, batch = await _prepare(request, model)
    vectors = await predictor.embed(loaded, batch)
    _timed(response, started)
    return EmbeddingResponse(
        model_id=model.id,
        dimensions=vectors.shape[1],
        embeddings=[{"filename": name, "embedding": v} for (name, _), v in zip(images, vectors.tolist(), strict=True)],
    )
