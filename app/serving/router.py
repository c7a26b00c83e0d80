"""/v1/models/{ref}/predict and /embed: HTTP to `app.serving.service`."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from app.core.auth import PredictKey
from app.core.storage import OWN_BODY_LIMIT
from app.models.dependencies import ServedModelDep
from app.serving.schemas import IMAGES_BODY, EmbeddingResponse, PredictionResponse
from app.serving.service import Serving, read_images

router = APIRouter(prefix="/v1/models", tags=["models"])


async def _serving(request: Request) -> Serving:
    # async: FastAPI runs a plain `def` dependency in the thread pool, a trip each request would pay
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(_serving)]


@router.post(
    "/{model_id}/predict",
    response_model=PredictionResponse,
    openapi_extra=IMAGES_BODY,
    max_body_size=OWN_BODY_LIMIT,  # max_predict_bytes, in read_images
)
async def predict(
    model: ServedModelDep,
    _: PredictKey,
    serving: ServingDep,
    request: Request,
    response: Response,
    top_k: Annotated[int | None, Query(ge=1, description="Default: min(5, number of classes).")] = None,
    threshold: Annotated[
        float | None, Query(ge=0, le=1, description="Answer null for an image whose top probability is below this.")
    ] = None,
) -> PredictionResponse:
    answer = await serving.predict(model, await read_images(request, serving.settings), top_k, threshold)
    response.headers.update(answer.headers)
    return answer.body


@router.post(
    "/{model_id}/embed",
    response_model=EmbeddingResponse,
    openapi_extra=IMAGES_BODY,
    max_body_size=OWN_BODY_LIMIT,  # max_predict_bytes, in read_images
)
async def embed(model: ServedModelDep, _: PredictKey, serving: ServingDep, request: Request, response: Response) -> EmbeddingResponse:
    """The pooled features (the classifier's input) of each image."""
    answer = await serving.embed(model, await read_images(request, serving.settings))
    response.headers.update(answer.headers)
    return answer.body
