import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette import ServerSentEvent

from app.core import streams
from app.core.auth import AnyKey, ReadKey, TrainKey
from app.core.config import get_settings
from app.core.db import SessionDep
from app.core.ids import BIGINT_MAX, JobId
from app.core.pagination import PageDep
from app.db.tables import Job
from app.jobs import service
from app.jobs.schemas import JobCreate, JobEventList, JobList, JobOut
from app.jobs.usage import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
STREAM_BATCH = 500  # events read per poll of a stream


def _job(job_id: JobId, principal: AnyKey, session: SessionDep) -> Job:
    return service.get_job(session, principal.tenant_id, job_id)


JobDep = Annotated[Job, Depends(_job)]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
async def create_job(request: JobCreate, principal: TrainKey, session: SessionDep) -> JobOut:
    job = await run_in_threadpool(service.create_job, session, get_settings(), principal.tenant_id, request)
    return service.to_out(session, job)


@router.get("", response_model=JobList)
def list_jobs(principal: ReadKey, session: SessionDep, page: PageDep) -> JobList:
    return JobList(data=service.list_jobs(session, principal.tenant_id, page.limit, after=page.after))


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: JobDep, _: ReadKey, session: SessionDep) -> JobOut:
    return service.to_out(session, job)


@router.get("/{job_id}/events", response_model=JobEventList, responses=streams.STREAM_RESPONSE)
async def list_events(
    job: JobDep,
    _: ReadKey,
    session: SessionDep,
    request: Request,
    after: Annotated[int, Query(ge=0, le=BIGINT_MAX, description="Only events with a larger id (for polling).")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    stream: Annotated[bool, Query(description="Stream Server-Sent Events (as `Accept: text/event-stream` does).")] = False,
    last_event_id: Annotated[int | None, Header(ge=0, le=BIGINT_MAX, description="Resume a stream after this event.")] = None,
):  # fmt: skip
    """The job's events, oldest first. Streamed: each event as it happens (`id:` its id, `event:` its
    type), `progress` events (phase, step, images/s, ETA) as they change, and a last `end` event
    once the job has finished; a finished job's stream replays its events and ends. A client that
    reconnects with `Last-Event-ID` continues after that event."""
    if streams.wanted(request, stream):
        return streams.response(_stream(job.tenant_id, job.id, last_event_id if last_event_id is not None else after))
    return {"data": await run_in_threadpool(service.list_events, session, job.id, after, limit)}


async def _stream(tenant_id: str, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    sent = None
    async for _ in streams.polls():
        while True:  # every event since the last poll, in batches
            state = await run_in_threadpool(service.stream_state, tenant_id, job_id, after, STREAM_BATCH)
            if state is None:
                yield ServerSentEvent(json.dumps({"status": "deleted"}), event="end")
                return
            status, progress, events = state
            for event in events:
                yield ServerSentEvent(event.model_dump_json(), event=event.type, id=str(event.id))
                after = event.id
            if len(events) < STREAM_BATCH:
                break
        if status in TERMINAL:
            yield ServerSentEvent(json.dumps({"status": status}), event="end")
            return
        if progress != sent:
            yield ServerSentEvent(progress.model_dump_json(), event="progress")
            sent = progress


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job: JobDep, _: TrainKey, session: SessionDep) -> JobOut:
    return service.to_out(session, service.cancel_job(session, job))


@router.post("/{job_id}/pause", response_model=JobOut)
def pause_job(job: JobDep, _: TrainKey, session: SessionDep) -> JobOut:
    """Stop at the next safe point and free the worker; the job keeps its checkpoint (status paused,
    not counted as running). 409 unless queued or running."""
    return service.to_out(session, service.pause_job(session, job))


@router.post("/{job_id}/resume", response_model=JobOut)
def resume_job(job: JobDep, _: TrainKey, session: SessionDep) -> JobOut:
    """Queue a paused job again: it continues from its checkpoint and ends where an uninterrupted
    run would. 409 unless paused; 429 if the tenant is at its concurrent-jobs quota."""
    return service.to_out(session, service.resume_job(session, get_settings(), job))
