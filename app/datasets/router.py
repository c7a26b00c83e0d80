import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette import ServerSentEvent

from app.core import streams
from app.core.auth import AnyKey, ReadKey, TrainKey
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import DatasetId
from app.core.pagination import PageDep
from app.core.storage import OWN_BODY_LIMIT, receive_file
from app.datasets import audit, service
from app.datasets.schemas import AuditOut, DatasetList, DatasetOut
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


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(dataset: DatasetDep, _: TrainKey, session: SessionDep) -> None:
    service.delete_dataset(session, get_settings(), dataset)
