import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette import ServerSentEvent

from app.core import streams
from app.core.auth import AnyKey, ReadKey, TrainKey
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import DatasetId
from app.core.pagination import PageDep
from app.core.storage import OWN_BODY_LIMIT, receive_file
from app.datasets import audit, images, service
from app.datasets.schemas import AuditOut, DatasetList, DatasetOut, ImageList
from app.db.tables import Audit, Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def _dataset(dataset_id: DatasetId, principal: AnyKey, session: SessionDep) -> Dataset:
    return service.get_dataset(session, principal.tenant_id, dataset_id)


DatasetDep = Annotated[Dataset, Depends(_dataset)]

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": ".zip, .tar or .tar.gz in ImageFolder layout: <class>/<image>, "
                            "or train/<class>/<image> and val/<class>/<image>.",
                        },
                        "name": {"type": "string", "maxLength": 200},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DatasetOut,
    openapi_extra=UPLOAD_SCHEMA,
    max_body_size=OWN_BODY_LIMIT,  # max_upload_bytes, in receive_file
)
async def upload_dataset(request: Request, response: Response, principal: TrainKey, session: SessionDep) -> Dataset:
    """The archive is stored and the dataset answered `processing`; a worker checks and unpacks it
    (poll GET /v1/datasets/{id} until `ready` or `failed`)."""
    settings = get_settings()
    declared = request.headers.get("content-length", "")
    if declared.isdigit():  # refused before a byte of the body is read
        await run_in_threadpool(service.check_room, session, settings, principal.tenant_id, int(declared))
    upload = await receive_file(request, "file", settings.max_upload_bytes, settings.staging_dir)
    dataset = await run_in_threadpool(
        service.create_dataset, session, settings, principal.tenant_id, upload, upload.fields.get("name")
    )
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


@router.get("", response_model=DatasetList)
def list_datasets(principal: ReadKey, session: SessionDep, page: PageDep) -> dict:
    return {"data": service.list_datasets(session, principal.tenant_id, page.limit, page.after)}


@router.get("/{dataset_id}", response_model=DatasetOut, responses=streams.STREAM_RESPONSE)
def get_dataset(
    dataset: DatasetDep, principal: ReadKey, request: Request,
    stream: Annotated[bool, Query(description="Stream Server-Sent Events (as `Accept: text/event-stream` does).")] = False,
):  # fmt: skip
    """Streamed: a `dataset` event with the dataset now and on each change while it is processed,
    then an `end` event once it is ready or failed."""
    if streams.wanted(request, stream):
        return streams.response(_stream(principal.tenant_id, dataset.id))
    return dataset


async def _stream(tenant_id: str, dataset_id: str) -> AsyncIterator[ServerSentEvent]:
    sent = None
    async for _ in streams.polls():
        current = await run_in_threadpool(service.current, tenant_id, dataset_id)
        if current is None:
            yield ServerSentEvent(json.dumps({"status": "deleted"}), event="end")
            return
        if current != sent:
            yield ServerSentEvent(current.model_dump_json(), event="dataset")
            sent = current
        if current.status != "processing":
            yield ServerSentEvent(json.dumps({"status": current.status}), event="end")
            return


@router.get("/{dataset_id}/audit", response_model=AuditOut, responses={202: {"model": AuditOut}})
def get_audit(
    dataset: DatasetDep, _: ReadKey, session: SessionDep, response: Response,
    backbone: Annotated[str, Query(max_length=200)] = audit.DEFAULT_BACKBONE,
) -> Audit:  # fmt: skip
    """Duplicates (and train/val leakage), likely mislabelled images, confused classes and outliers,
    found with `backbone`'s features. Computed by a worker on first request (202 `processing`:
    poll this URL), then kept: 200 with the findings."""
    found, _ = audit.request_audit(session, dataset, backbone)
    if found.status == "processing":
        response.status_code = status.HTTP_202_ACCEPTED
    return found


@router.get("/{dataset_id}/images", response_model=ImageList)
def list_images(
    dataset: DatasetDep, _: ReadKey,
    label: Annotated[str | None, Query(max_length=200, description="Only the images of this class.")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Images per page, in path order.")] = 20,
    after: Annotated[str | None, Query(max_length=2000, description="The `path` of the last image of the previous "
                                       "page: this page starts after it.")] = None,
) -> dict:  # fmt: skip
    """The images a ready dataset keeps (those its jobs train and validate on), sorted by path. 409
    `dataset_not_ready` while it is processing or once it failed; 422 `unknown_label` for a class it
    does not have."""
    return {"data": images.list_images(get_settings(), dataset, label, limit, after)}


@router.get(
    "/{dataset_id}/images/{path:path}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "A JPEG thumbnail"}},
)  # fmt: skip
def get_image(
    dataset: DatasetDep, _: ReadKey,
    path: Annotated[str, Path(max_length=2000, description="An image's `path`, as GET /v1/datasets/{dataset_id}/images "
                              "lists it.")],
    size: Annotated[int, Query(ge=16, le=512, description="The thumbnail's longest side at most, in pixels.")] = 160,
) -> Response:  # fmt: skip
    """A thumbnail of one of the dataset's images, the right way up (EXIF orientation applied).
    A path that is not one of its images is 404 `image_not_found`."""
    thumbnail = images.thumbnail(get_settings(), dataset, path, size)
    return Response(thumbnail, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset: DatasetDep, _: TrainKey, session: SessionDep) -> None:
    service.delete_dataset(session, get_settings(), dataset)
